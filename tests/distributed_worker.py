"""The cases of ``tests/test_distributed.py``, and the script its launcher runs on every rank.

Launched as ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT``, each rank trains
every case with ``train()`` (DDP and FSDP, the mode set per case) and saves what it trained under
``OUT/<case>/``: the adapter through ``save_adapter`` (once, by rank 0), the trained tensors as
rank 0 gathered them (``trained.pt``) and the history. The test builds the same cases in one
process (``build``, ``batches``), trains them there and compares. The launches that must fail
write the error they raised to ``OUT/errors.json``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from peft_from_scratch import core, train
from peft_from_scratch.core import registry
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.training import BackpropStep, TrainConfig, distributed, make_adamw
from scripts.train_distributed import trained_state   # the provided script's: adapter, or every trained weight

STEPS, ROWS, BATCH = 3, 16, 4
# SGD for the equivalence: a parallel run differs from one process by the rounding of the gradient
# average, and SGD carries that difference as it is; Adam divides by sqrt(v), so an entry whose
# gradient is near 0 moves by about lr whatever its sign, and rounding can flip that sign. Adam runs
# too (the "-adamw" cases), on adapters moved off their init, where no gradient is near 0.
OPTIMIZERS = {"sgd": (lambda params, config: torch.optim.SGD(params, lr=config.lr), 0.5), "adamw": (make_adamw, 1e-2)}


def adapter_cases() -> list[tuple[str, str, int]]:
    """(mode, method, example index) for every registered adapter method's tiny-Llama examples."""
    out = []
    for method in registry.methods(kind="adapter"):
        for i, (arch, _) in enumerate(method.obj.examples()):
            if arch == "llama":
                out += [("ddp", method.name, i), ("fsdp", method.name, i)]
    return out


# name -> (mode, what, optimizer): adapters by (method, example), peft's LoRA, full fine-tuning, QLoRA
CASES = {f"{mode}-{name}-{i}": (mode, (name, i), "sgd") for mode, name, i in adapter_cases()}
CASES.update({f"{mode}-{what}": (mode, what, "sgd") for mode in ("ddp", "fsdp") for what in ("full", "qlora")})
CASES.update({f"{mode}-peft_lora": (mode, "peft_lora", "sgd") for mode in ("ddp", "fsdp")})
CASES.update({f"{mode}-lora-0-adamw": (mode, ("lora", 0), "adamw") for mode in ("ddp", "fsdp")})
PEFT_FORMAT = ("ddp-lora-0", "fsdp-lora-0")   # also saved in peft's format, through the interop module
# gradient accumulation over 2 masked micro-batches: each micro-batch's loss weighted by its rank's share
ACCUMULATED = {f"{mode}-lora-0-accumulated" for mode in ("ddp", "fsdp")}
CASES.update({name: (name.split("-")[0], ("lora", 0), "sgd") for name in sorted(ACCUMULATED)})
MASKED = {f"{mode}-lora-0-accumulated" for mode in ("ddp", "fsdp")} | {f"{mode}-{what}-masked" for mode in ("ddp", "fsdp") for what in ("lora-0", "full")}
CASES.update({f"{mode}-lora-0-masked": (mode, ("lora", 0), "sgd") for mode in ("ddp", "fsdp")})
CASES.update({f"{mode}-full-masked": (mode, "full", "sgd") for mode in ("ddp", "fsdp")})


def build(what):
    """A fresh tiny Llama with the case's trainable part (seeded: every rank builds the same)."""
    model = tiny_llama()
    if what == "plain":
        return model
    if what == "full":
        model.train().requires_grad_(True)
    elif what == "qlora":
        from peft_from_scratch import LoRAConfig, prepare_qlora
        model = prepare_qlora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    elif what == "peft_lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    else:
        name, i = what
        config = registry.config_class(name).examples()[i][1]
        if getattr(config, "dropout", 0.0):
            # each rank draws its own dropout masks: a parallel run then equals one process in
            # distribution only, so the equivalence runs without dropout
            config = dataclasses.replace(config, dropout=0.0)
        model = core.add_adapter(model, config)
        config.simulate_training(model, torch.Generator().manual_seed(1))   # adapters off their init values
    return model


def batches(rows: int = ROWS, batch_size: int = BATCH, masked: bool = False, **loader_args) -> DataLoader:
    """Next-token batches of 12 tokens; ``masked``: each row's first 0-8 labels -100 (a prompt), so
    the ranks' slices hold different label counts."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (rows, 12), generator=g)
    prompt = torch.randint(0, 9, (rows,), generator=g) if masked else torch.zeros(rows, dtype=torch.long)
    labels = ids.masked_fill(torch.arange(12) < prompt[:, None], -100)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                      **loader_args)


def config(mode: str, optimizer: str = "sgd", grad_accum: int = 1) -> TrainConfig:
    return TrainConfig(lr=OPTIMIZERS[optimizer][1], max_steps=STEPS, warmup_ratio=0.0, schedule="constant",
                       parallel=mode, grad_accum=grad_accum)


def step(optimizer: str) -> BackpropStep:
    return BackpropStep(OPTIMIZERS[optimizer][0])


def run_case(name: str, out: Path) -> None:
    mode, what, optimizer = CASES[name]
    model = build(what)
    data = batches(masked=name in MASKED)
    accum = 2 if name in ACCUMULATED else 1
    history = train(model, data, config(mode, optimizer, accum), step=step(optimizer), progress=False)
    state = trained_state(model)
    if getattr(model, "adapter_config", None) is not None:
        core.save_adapter(model, out / name / "adapter")
    if name in PEFT_FORMAT:
        from peft_from_scratch.interop import peft as pio
        pio.save_peft_adapter(model, out / name / "peft")
    if distributed.is_main():
        torch.save(state, out / name / "trained.pt")
        (out / name / "history.json").write_text(json.dumps(history.to_dict()))


def bad_launches() -> dict[str, str]:
    """Each launch that must be refused, and the error each rank got."""
    from peft_from_scratch.optim import LomoStep, make_flora
    attempts = {
        "batch_not_divisible": lambda: train(build("full"), batches(batch_size=3, drop_last=True), config("ddp")),
        "last_batch_not_divisible": lambda: train(build("full"), batches(rows=15), config("ddp")),
        "step_not_parallel": lambda: train(build("full"), batches(), config("ddp"), step=LomoStep()),
        "optimizer_needs_whole_matrices": lambda: train(build(("lora", 0)), batches(), config("fsdp"),
                                                        step=BackpropStep(make_flora(rank=2))),
        "ranks_built_different_models": lambda: train(tiny_llama(seed=torch.distributed.get_rank()).train(),
                                                      batches(), config("fsdp")),
    }
    errors = {}
    for key, attempt in attempts.items():
        try:
            attempt()
            errors[key] = "no error"
        except ValueError as e:
            errors[key] = str(e)
    return errors


def main(out: str) -> None:
    out = Path(out)
    for name in CASES:
        (out / name).mkdir(parents=True, exist_ok=True)
        run_case(name, out)
    errors = bad_launches()
    if distributed.is_main():
        (out / "errors.json").write_text(json.dumps(errors, indent=2))
    distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
