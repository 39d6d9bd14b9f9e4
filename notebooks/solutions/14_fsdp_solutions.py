# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 14 · Data parallelism and sharding: solutions to the exercises
#
# The answers use SmolLM2 (a tiny random Llama in the smoke profile), the chapter's LoRA (r = 8 on
# every linear layer) and QLoRA, real E2E NLG batches, and one FSDP run of the chapter's script.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import copy
import json
import math
import tempfile
from pathlib import Path

from peft_from_scratch import bib, core, data, models   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.quantized import prepare_qlora
from peft_from_scratch.reparameterized import LoRAConfig
from peft_from_scratch.training import distributed

import torch
from IPython.display import Markdown, display

run = start("14_fsdp_solutions", profile, seed, results_dir)
if run.profile == "smoke":
    base, tok = models.tiny_llama(), None
else:
    base, tok = models.load_model(models.SMOLLM2)
lora = core.add_adapter(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
psi = sum(p.numel() for p in base.parameters())                   # tied weights counted once
psi_a = sum(p.numel() for p in lora.parameters() if p.requires_grad)
print(f"Ψ = {psi:,d} parameters; LoRA r = 8 trains Ψ_a = {psi_a:,d}")

# %% [markdown]
# ## 1 · ZeRO's three stages, float32 Adam
#
# Per trained parameter one process holds 4 bytes of weight, 4 of gradient and 8 of Adam moments
# (16; ZeRO's mixed precision has 2 + 2 + 12); per frozen one 4. Stage by stage, rank by rank:
#
# * $P_{os}$: weights and gradients whole, optimizer state / N;
# * $P_{os+g}$: weights whole, gradients and optimizer state / N;
# * $P_{os+g+p}$: everything / N (FSDP's full sharding).

# %%
def per_rank(frozen, trained, n):
    """Bytes per rank of (DDP, P_os, P_os+g, P_os+g+p) for ``frozen`` and ``trained`` parameter counts."""
    w, g, s = 4 * (frozen + trained), 4 * trained, 8 * trained
    return {"DDP": w + g + s, "P_os": w + g + s / n, "P_os+g": w + (g + s) / n, "P_os+g+p": (w + g + s) / n}


rows = ["| method | N | DDP | P_os | P_os+g | P_os+g+p |", "|---|---|---|---|---|---|"]
answer = {}
for method, (frozen, trained) in {"full fine-tuning": (0, psi), "LoRA r = 8": (psi, psi_a)}.items():
    for n in (2, 8, 64):
        b = per_rank(frozen, trained, n)
        answer[(method, n)] = b
        rows.append(f"| {method} | {n} | " + " | ".join(f"{v / 2**20:,.1f} MiB" for v in b.values()) + " |")
display(Markdown("\n".join(rows)))
lora_64 = answer[("LoRA r = 8", 64)]
print(f"LoRA at N = 64: stages 1 and 2 save {1 - lora_64['P_os+g'] / lora_64['DDP']:.1%} of a rank's bytes, "
      f"stage 3 {1 - lora_64['P_os+g+p'] / lora_64['DDP']:.1%}")

# %% [markdown]
# For full fine-tuning each stage helps (the optimizer state is half the bytes, so stage 1 alone
# nearly halves them at large N). For an adapter, stages 1 and 2 shard what is already small (the
# adapter's gradients and moments); only stage 3, the base's weights, matters. That is why FSDP,
# not a sharded optimizer, is what lets QLoRA-style fine-tuning use several GPUs for one big model.
#
# ## 2 · QLoRA's bytes per rank under FSDP
#
# Under FSDP each packed 4-bit weight becomes a frozen parameter (`train()` turns the buffer into
# one, because FSDP shards parameters and never buffers), so it is cut along its first dimension
# like any weight; its block constants and code books stay buffers, whole on every rank.

# %%
N = 2


def shard_bytes(t, rank, n=N):
    size = math.ceil(t.shape[0] / n)
    rows = max(0, min(size, t.shape[0] - rank * size))
    return rows * math.prod(t.shape[1:]) * t.element_size()


qlora = prepare_qlora(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
packed = [m.weight for m in qlora.modules() if type(m).__name__ == "Linear4bit"]
params = list({id(p): p for p in qlora.parameters()}.values())
buffers = list({id(b): b for b in qlora.buffers()}.values())
ids = {id(p) for p in packed}


def predict_frozen(rank):
    sharded = sum(shard_bytes(p, rank) for p in params if not p.requires_grad) + sum(shard_bytes(p, rank) for p in packed)
    whole = sum(b.numel() * b.element_size() for b in buffers if id(b) not in ids)
    return sharded, whole


predicted = [predict_frozen(r) for r in range(N)]
for r, (sharded, whole) in enumerate(predicted):
    print(f"rank {r}: sharded frozen {sharded / 2**20:.2f} MiB + whole on every rank {whole / 2**20:.3f} MiB")

sizes = run.pick(smoke=["--tiny", "--steps", "1", "--n-train", "4", "--n-test", "4"],
                 cpu=["--steps", "1", "--n-train", "4", "--n-test", "4"], gpu=["--steps", "1", "--n-train", "4", "--n-test", "4"])
out = Path(tempfile.mkdtemp(prefix="pfs14s_"))
distributed.launch(bib.REPO / "scripts" / "train_distributed.py", ["--method", "qlora", "--progress", "line", "--out", out, *sizes],
                   processes=N, fsdp=True, cpu=True, cwd=bib.REPO)
measured = [r["frozen base"] for r in json.loads((out / "qlora" / "result.json").read_text())["memory_per_rank"]]
print("measured frozen base per rank:", ", ".join(f"{m / 2**20:.2f} MiB" for m in measured))
print("prediction = measurement, byte for byte:",
      run.check("qlora_shard_prediction", [s + w for s, w in predicted] == measured))

# %% [markdown]
# The replicated part is a few hundred KiB: nested absmax (1 byte per 64 weights, plus one float
# per 256 of them) and two code books per layer. Sharded, the 4-bit codes themselves shrink with N,
# so QLoRA under FSDP gains both factors: 4 bits per weight and 1/N of them per rank.
#
# ## 3 · Without the label-count weighting
#
# Each rank's mean loss over its $n_r$ labels, averaged plainly over 2 ranks, against the whole
# batch's mean over all its labels, on real batches of 4 E2E examples (the prompt masked):

# %%
if run.profile == "smoke":
    g = torch.Generator().manual_seed(seed)
    ids_ = torch.randint(1, 128, (12, 16), generator=g)
    prompt = torch.randint(0, 12, (12,), generator=g)
    rows_ = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.masked_fill(torch.arange(16) < p, -100)}
             for x, p in zip(ids_, prompt)]
    loader = torch.utils.data.DataLoader(rows_, batch_size=4)
else:
    rows_ = data.tokenize_causal(data.load_e2e("train", n=run.pick(smoke=12, cpu=48, gpu=200), seed=seed), tok,
                                 data.e2e_example, max_length=160)
    loader = data.make_loader(rows_, 4, pad_token_id=tok.pad_token_id)
gaps, exact = [], []
with torch.no_grad():
    for batch in loader:
        whole = base(**batch).loss.item()
        halves = [distributed.Parallel("ddp", r, 2).shard(batch) for r in range(2)]
        losses = [base(**h).loss.item() for h in halves]
        counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
        weighted = sum(c * l for c, l in zip(counts, losses)) / sum(counts)
        exact.append(abs(weighted - whole) / whole)
        gaps.append(abs(sum(losses) / 2 - whole) / whole)
print(f"{len(gaps)} batches: plain mean off by {sum(gaps) / len(gaps):.2%} on average (at most {max(gaps):.2%}); "
      f"label-weighted off by at most {max(exact):.1e}")
print("weighted = whole batch (1e-5):", run.check("weighted_loss_is_the_batch_loss", max(exact) < 1e-5))

# %% [markdown]
# A plain average would weight each label by $1/(N n_r)$ instead of $1/n$: labels of short rows
# count more. It is still a sensible loss, but another one than the single process minimises, so
# a parallel run would stop being a faster copy of the run in the other chapters.
#
# ## 4 · Peak RSS, and the meta device
#
# Every rank calls `models.load_model` and so holds the whole model before `fully_shard` cuts it:
# the peak RSS counts it once per rank, on top of the interpreter and the libraries. On the meta
# device a model has shapes and no bytes; FSDP can shard it there and each rank then materialises
# and loads only its shard:

# %%
with torch.device("meta"):
    ghost = type(base)(base.config)
print(f"{sum(p.numel() for p in ghost.parameters()):,d} parameters on the meta device, "
      f"{sum(p.numel() * p.element_size() for p in ghost.parameters() if not p.is_meta):,d} bytes allocated")

# %%
_ = run.save(metrics={"zero_stages_bytes": {f"{m} N={n}": b for (m, n), b in answer.items()},
                      "qlora_predicted_frozen": predicted, "qlora_measured_frozen": measured,
                      "plain_mean_relative_gap": gaps, "weighted_relative_gap": exact})
