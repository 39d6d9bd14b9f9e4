"""Train an adapter on SmolLM2 (E2E NLG) with the library's one loop, in one process or several.

    python scripts/train_distributed.py --check                                         # one process
    accelerate launch --multi_gpu --num_processes 2 scripts/train_distributed.py --check  # DDP
    accelerate launch --use_fsdp --num_processes 2 scripts/train_distributed.py --check   # FSDP
    torchrun --nproc_per_node 2 scripts/train_distributed.py --parallel fsdp

On a machine without GPUs accelerate's ``--multi_gpu`` launcher starts CPU processes that talk over
gloo; on a GPU node the same commands give each process its GPU (NCCL). Every rank runs this whole
file; ``train()`` shards each batch of ``--batch`` rows over the ranks, so the run takes the steps
one process would take on the same batches. ``--check`` proves it: rank 0 trains the same adapter
again alone and compares the tensors, then loads the adapter the parallel run saved and compares
it bit for bit. Writes ``OUT/adapter/`` (``save_adapter``) and ``OUT/result.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from peft_from_scratch import DoRAConfig, LoRAConfig, add_adapter, data, load_adapter, models, prepare_qlora, train
from peft_from_scratch.core.checkpoint import adapter_state_dict, save_adapter
from peft_from_scratch.training import BackpropStep, TrainConfig, distributed, evaluate_loss

TOLERANCE = 1e-5   # max |parallel - one process| over the adapter's tensors (float32 rounding of the average)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["lora", "dora", "qlora", "full"], default="lora",
                   help="full: full fine-tuning (every weight trained; nothing saved but result.json)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step, over all ranks")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="keep SmolLM2's first N layers (faster)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on random tokens (seconds; for tests)")
    p.add_argument("--parallel", default="auto", choices=distributed.MODES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/distributed"))
    p.add_argument("--check", action="store_true", help="rank 0 also trains alone and compares")
    return p.parse_args(argv)


def task(args):
    """(base model builder, loaders builder): SmolLM2 on E2E NLG, or the tiny stand-in. Each call of
    ``loaders()`` gives a new (train, test) pair, so a second run sees the same shuffled order."""
    if args.tiny:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(1, 128, (args.n_train + args.n_test, 16), generator=g)
        rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
        make = lambda part, shuffle, batch: torch.utils.data.DataLoader(  # noqa: E731
            part, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(args.seed))
        return models.tiny_llama, lambda: (make(rows[:args.n_train], True, args.batch), make(rows[args.n_train:], False, 8))
    base, tokenizer = models.load_model(models.SMOLLM2)
    if args.layers:
        models.keep_layers(base, args.layers)
    tok = lambda rows: data.tokenize_causal(rows, tokenizer, data.e2e_example, max_length=160)  # noqa: E731
    train_set = tok(data.load_e2e("train", n=args.n_train, seed=args.seed))
    test_set = tok(data.load_e2e("test", n=args.n_test, seed=args.seed))
    make = lambda part, shuffle, batch: data.make_loader(part, batch, shuffle=shuffle, seed=args.seed,  # noqa: E731
                                                         pad_token_id=tokenizer.pad_token_id)
    return lambda: copy.deepcopy(base), lambda: (make(train_set, True, args.batch), make(test_set, False, 8))


def adapted(args, fresh):
    torch.manual_seed(args.seed)          # the adapter's initial values, the same on every rank
    if args.method == "full":
        return fresh().requires_grad_(True)
    config = (DoRAConfig if args.method == "dora" else LoRAConfig)(r=args.r, alpha=2 * args.r,
                                                                   target_modules="all-linear")
    if args.method == "qlora":
        return prepare_qlora(fresh(), config)
    return add_adapter(fresh(), config)


def run(args, fresh, loaders, parallel: str):
    model = adapted(args, fresh)
    train_loader, test_loader = loaders()
    config = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_ratio=0.0, seed=args.seed, parallel=parallel)
    step = BackpropStep()
    history = train(model, train_loader, config, eval_fn=lambda m: {"test_loss": evaluate_loss(m, test_loader)},
                    desc=f"{args.method} ({parallel})", step=step)
    return model, history, step


def trained_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, or every trained weight (full fine-tuning), whole (every rank calls it)."""
    if getattr(model, "adapter_config", None) is not None:
        return {k: v.clone() for k, v in adapter_state_dict(model).items()}
    return {n: distributed.full_tensor(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rss_mb() -> float:
    """This process's resident memory now (Linux), in MiB."""
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    args = parse(argv)
    fresh, loaders = task(args)
    model, history, step = run(args, fresh, loaders, args.parallel)
    memory = {**distributed.model_state_bytes(model, step.optimizer), "peak_rss_mb": history.peak_memory_mb,
              "rss_mb": rss_mb()}
    per_rank = distributed.gather_object(memory)                       # every rank's, on every rank
    parallel_state = trained_state(model)                               # every rank: FSDP gathers
    adapter = getattr(model, "adapter_config", None) is not None
    if adapter:
        save_adapter(model, args.out / "adapter")                       # every rank; rank 0 writes
    result = {"device": history.device, "world_size": history.world_size, "steps": args.steps,
              "batch": args.batch, "method": args.method, "loss": history.loss,
              "test_loss": history.final_eval["test_loss"], "seconds": history.wall_time_s,
              "trainable_params": history.trainable_params, "memory_per_rank": per_rank,
              "memory_whole": distributed.model_state_bytes(model, step.optimizer, whole=True)}
    ok = True
    if args.check and distributed.is_main():
        alone, alone_history, _ = run(args, fresh, loaders, "none")
        alone_state = trained_state(alone)
        diff = max((parallel_state[k] - alone_state[k]).abs().max().item() for k in alone_state)
        exact = True
        if adapter:
            loaded = load_adapter(adapted(args, fresh), args.out / "adapter")
            exact = all(torch.equal(v, parallel_state[k]) for k, v in adapter_state_dict(loaded).items())
        ok = diff <= TOLERANCE and exact
        result.update(max_abs_diff_vs_one_process=diff, tolerance=TOLERANCE, loaded_bit_exact=exact,
                      one_process_loss=alone_history.loss, one_process_test_loss=alone_history.final_eval["test_loss"])
        print(f"{history.world_size} ranks vs one process: max |diff| of the adapter {diff:.2e} "
              f"(tolerance {TOLERANCE:g})" + (f"; the saved adapter loads bit-exactly: {exact}" if adapter else ""))
    if distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"test loss {result['test_loss']:.4f}; wrote {args.out / 'adapter'} and {args.out / 'result.json'}")
    distributed.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
