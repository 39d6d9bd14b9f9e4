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
it bit for bit. Writes, per method, ``OUT/<method>/adapter/`` (``save_adapter``) and
``OUT/<method>/result.json`` (losses, test loss, each rank's model-state bytes).
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
from peft_from_scratch.equivalence import Diff
from peft_from_scratch.training import BackpropStep, TrainConfig, distributed, evaluate_loss, set_progress

# --check's rule, as tests/helpers.py's comparison with peft: each element within
# ATOL * max(1, max|one process|) + RTOL * |one process| (float32 rounding of averaging the ranks'
# gradients) for the first step's gradients (the evidence: the backward passes agree) and every step's
# loss; after the last AdamW step all parameters but a share ADAM_OUTLIERS, because Adam divides each
# element's gradient by its own running magnitude: an element whose gradient is at rounding level gets
# a step of about lr in a direction the rounding decides.
RTOL, ATOL, ADAM_OUTLIERS = 1e-5, 1e-6, 1e-4


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora", help="lora, dora, qlora or full (full fine-tuning: nothing saved "
                   "but the result), or several, comma-separated: each trained in turn by the same processes")
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
    p.add_argument("--progress", choices=["bar", "line"], default="bar", help="line: one line per run")
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


def adapted(args, fresh, method: str):
    torch.manual_seed(args.seed)          # the adapter's initial values, the same on every rank
    if method == "full":
        return fresh().requires_grad_(True)
    config = (DoRAConfig if method == "dora" else LoRAConfig)(r=args.r, alpha=2 * args.r, target_modules="all-linear")
    if method == "qlora":
        return prepare_qlora(fresh(), config)
    return add_adapter(fresh(), config)


def run(args, fresh, loaders, method: str, parallel: str):
    model = adapted(args, fresh, method)
    train_loader, test_loader = loaders()
    config = TrainConfig(lr=args.lr, max_steps=args.steps, warmup_ratio=0.0, seed=args.seed, parallel=parallel)
    step = FirstGradients()
    history = train(model, train_loader, config, eval_fn=lambda m: {"test_loss": evaluate_loss(m, test_loader)},
                    desc=f"{method} ({parallel})", step=step)
    return model, history, step


class FirstGradients(BackpropStep):
    """``BackpropStep`` that keeps the first step's gradients (whole, by name) as the optimizer sees them."""

    def setup(self, model, config):
        trainable = super().setup(model, config)
        names, self.gradients = {id(p): n for n, p in model.named_parameters()}, {}

        def record(optimizer, args, kwargs):
            if not self.gradients:   # every rank runs this (gathering an FSDP shard is a collective)
                self.gradients = {names[id(p)]: distributed.full_tensor(p.grad).detach().clone()
                                  for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        self.optimizer.register_step_pre_hook(record)
        return trainable


def compare(parallel: dict[str, torch.Tensor], alone: dict[str, torch.Tensor]) -> dict:
    """How far the parallel run's tensors are from one process's: the largest difference and how many
    elements fall outside RTOL/ATOL (equivalence.Diff)."""
    diff = Diff()
    for k in alone:
        diff.update(parallel[k], alone[k], RTOL, ATOL)
    return {"max_abs": diff.abs, "max_rel": diff.rel, "outside": diff.outside, "total": diff.total}


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


METHODS = ("lora", "dora", "qlora", "full")


def main(argv=None) -> int:
    args = parse(argv)
    methods = args.method.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown --method {unknown}: choose from {METHODS}")
    set_progress(args.progress)
    fresh, loaders = task(args)
    ok = [train_one(args, fresh, loaders, method, args.out / method) for method in methods]
    distributed.barrier()
    return 0 if all(ok) else 1


def train_one(args, fresh, loaders, method: str, out: Path) -> bool:
    """Train ``method`` in this run's processes (and, with --check, alone on rank 0); write ``out``."""
    model, history, step = run(args, fresh, loaders, method, args.parallel)
    memory = {**distributed.model_state_bytes(model, step.optimizer), "peak_rss_mb": history.peak_memory_mb,
              "rss_mb": rss_mb()}
    per_rank = distributed.gather_object(memory)                       # every rank's, on every rank
    parallel_state = trained_state(model)                               # every rank: FSDP gathers
    adapter = getattr(model, "adapter_config", None) is not None
    if adapter:
        save_adapter(model, out / "adapter")                            # every rank; rank 0 writes
    result = {"device": history.device, "world_size": history.world_size, "steps": args.steps,
              "batch": args.batch, "method": method, "loss": history.loss,
              "test_loss": history.final_eval["test_loss"], "seconds": history.wall_time_s,
              "trainable_params": history.trainable_params, "memory_per_rank": per_rank,
              "memory_whole": distributed.model_state_bytes(model, step.optimizer, whole=True)}
    ok = True
    if args.check and distributed.is_main():
        alone, alone_history, alone_step = run(args, fresh, loaders, method, "none")
        gradients = compare(step.gradients, alone_step.gradients)
        params = compare(parallel_state, trained_state(alone))
        losses = compare({"loss": torch.tensor(history.loss)}, {"loss": torch.tensor(alone_history.loss)})
        exact = True
        if adapter:
            loaded = load_adapter(adapted(args, fresh, method), out / "adapter")
            exact = all(torch.equal(v, parallel_state[k]) for k, v in adapter_state_dict(loaded).items())
        ok = (gradients["outside"] == 0 and losses["outside"] == 0 and exact
              and params["outside"] <= ADAM_OUTLIERS * params["total"])
        result.update(check={"passed": ok, "rtol": RTOL, "atol": ATOL, "adam_outliers": ADAM_OUTLIERS,
                             "first_gradients": gradients, "losses": losses, "parameters": params,
                             "loaded_bit_exact": exact},
                      one_process_loss=alone_history.loss, one_process_test_loss=alone_history.final_eval["test_loss"])
        print(f"{method}: {history.world_size} ranks vs one process: first gradients max rel diff "
              f"{gradients['max_rel']:.1e} ({gradients['outside']} outside rtol {RTOL:g} / atol {ATOL:g}), losses "
              f"{losses['max_rel']:.1e}; after {args.steps} AdamW steps {params['outside']} of {params['total']:,d} "
              f"parameters outside (allowed: {ADAM_OUTLIERS:g} of them), max |diff| {params['max_abs']:.1e}"
              + (f"; the saved adapter loads bit-exactly: {exact}" if adapter else "") + f": {'PASS' if ok else 'FAIL'}")
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{method}: test loss {result['test_loss']:.4f}; wrote {out}")
    del model, step
    return ok


if __name__ == "__main__":
    sys.exit(main())
