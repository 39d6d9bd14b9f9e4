# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · RoSA: solutions to the exercises
#
# The answers train many adapters, so they run on SmolLM2 cut to its first layers (8 in the cpu
# profile, 2 in the smoke profile, all 30 on a GPU) with the chapter's recipe: α = 16, LoRA lr 1e-3,
# sparse lr 3e-4, a LoRA-only warm-up, the mean squared gradient over a few batches, a restart. Every
# adapter trains on the same GSM8K problems in the same order for the same steps and is scored by the
# chapter's held-out loss (per test problem, then averaged), with paired bootstrap intervals.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
from peft_from_scratch import core, data, models, tasks, verdicts   # first: it quiets tqdm.auto's warning

import copy
import time

import torch

from peft_from_scratch.blocks.masks import top_k_mask
from peft_from_scratch.notebook import start
from peft_from_scratch.quantized import Linear4bit, quantize_model
from peft_from_scratch.reparameterized import rosa
from peft_from_scratch.reparameterized.rosa import RoSAConfig
from peft_from_scratch.training import TrainConfig, train

run = start("09_rosa_solutions", profile, seed, results_dir)
cfg = run.pick(
    smoke=dict(layers=2, n_train=2, batch=1, steps=1, warmup_steps=0, fisher_batches=1, n_test=2, max_length=192,
               timed_steps=1),
    cpu=dict(layers=8, n_train=32, batch=4, steps=8, warmup_steps=3, fisher_batches=2, n_test=24, max_length=256,
             timed_steps=3),
    gpu=dict(layers=None, n_train=1000, batch=16, steps=60, warmup_steps=16, fisher_batches=4, n_test=200, max_length=512,
             timed_steps=3),
)
smol, tok = models.load_model(models.SMOLLM2)
if cfg["layers"]:
    models.keep_layers(smol, cfg["layers"])
smol.to(run.torch_device)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR_LORA, LR_SPARSE, ALPHA = 1e-3, 3e-4, 16
tokenize = lambda rows: data.tokenize_causal(rows, tok, data.gsm8k_example, max_length=cfg["max_length"])  # noqa: E731
train_ds = tokenize(data.load_gsm8k("train", n=cfg["n_train"], seed=seed))
test_ds = tokenize(data.load_gsm8k("test", n=cfg["n_test"], seed=seed))
to_device = lambda b: {k: v.to(run.torch_device) for k, v in b.items()}  # noqa: E731
loader = lambda ds, shuffle=False: data.make_loader(ds, cfg["batch"] if shuffle else 16, shuffle=shuffle, seed=seed,  # noqa: E731
                                                    pad_token_id=tok.pad_token_id)
fisher_batches = [to_device(b) for b in list(data.make_loader(train_ds, cfg["batch"], shuffle=True, seed=seed + 1,
                                                              pad_token_id=tok.pad_token_id))[: cfg["fisher_batches"]]]


def config_for(r: int, base=smol) -> RoSAConfig:
    """LoRA rank r plus (16 - r)(d_in + d_out) sparse entries per layer: LoRA r = 16's budget."""
    sparse = rosa.lora_budget_density(base, TARGETS, 16 - r) if r < 16 else {}
    return RoSAConfig(r=r, alpha=ALPHA, d=0, target_modules=TARGETS, lr_lora=LR_LORA, lr_sparse=LR_SPARSE,
                      density_pattern=sparse)


def train_fn(name):
    return lambda m: train(m, loader(train_ds, shuffle=True), TrainConfig(lr=LR_LORA, max_steps=cfg["steps"], seed=seed),
                           params=rosa.param_groups(m), desc=name)


def warmup_fn(m):
    return train(m, loader(train_ds, shuffle=True), TrainConfig(lr=LR_LORA, max_steps=cfg["warmup_steps"], seed=seed),
                 desc="warm-up (LoRA only)")


def fit(name, config, base=smol, warmup=True, masks=None):
    """The chapter's schedule (warm-up, Fisher mask, restart, train), or the given ``masks`` instead of
    the Fisher ones; returns (model, per-problem held-out losses, masks)."""
    model = copy.deepcopy(base)
    if masks is not None:                                  # a mask chosen some other way: no warm-up needed
        core.add_adapter(model, config)
        rosa.set_masks(model, masks)
        train_fn(name)(model)
    elif config.density_pattern:
        masks = rosa.train_rosa(model, config, train_fn=train_fn(name), fisher_batches=fisher_batches,
                                warmup_fn=warmup_fn if warmup and cfg["warmup_steps"] else None).masks
    else:                                                  # LoRA: no sparse part
        core.add_adapter(model, config)
        train_fn(name)(model)
    return model, tasks.example_losses(model, loader(test_ds)), masks


mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
rosa12, losses = {}, {}
rosa12["model"], losses["RoSA r=12"], rosa12["masks"] = fit("RoSA r=12 (Fisher mask)", config_for(12))

# %% [markdown]
# ## 1. QRoSA: RoSA on a 4-bit base
#
# `quantize_model` replaces every linear layer but the head by our NF4 `Linear4bit` (double
# quantization, blocks of 64). RoSA then wraps those layers: the Fisher hooks compute
# $G = g^\top x$ from the layer's input and output gradient, so they never need the float $W_0$, and the
# adapter lives in float32.

# %%
smol_4bit = quantize_model(copy.deepcopy(smol), TARGETS)
qrosa, losses["QRoSA r=12"], _ = fit("QRoSA r=12", config_for(12, smol_4bit), base=smol_4bit)
bases = [layer.base_layer for layer in rosa.rosa_layers(qrosa).values()]
_ = run.check("qrosa_adapts_4bit_layers_with_float32_adapters",
              all(isinstance(b, Linear4bit) for b in bases)
              and all(p.dtype == torch.float32 for p in qrosa.parameters() if p.requires_grad))
q_gap = verdicts.mean_difference(losses["QRoSA r=12"], losses["RoSA r=12"], what="test problems")
print(f"held-out loss: RoSA {mean(losses['RoSA r=12']):.3f}, QRoSA {mean(losses['QRoSA r=12']):.3f}; "
      f"QRoSA minus RoSA = {q_gap}")
# The paper reports QRoSA on a 4-bit LLaMA-2-7B close to RoSA (and above QLoRA). The difference above
# is what NF4's rounding of every frozen weight costs after this run's training, with its interval.
del smol_4bit, qrosa

# %% [markdown]
# ## 2. A random mask of the same size
#
# Same budget, same restart, same training; only the positions differ: k entries per layer drawn
# uniformly (`top_k_mask` of uniform scores).

# %%
g = torch.Generator().manual_seed(seed)
random_masks = {name: top_k_mask(torch.rand(layer.shape, generator=g), layer.k).to(run.torch_device)
                for name, layer in rosa.rosa_layers(rosa12["model"]).items()}
random_model, losses["RoSA r=12, random mask"], _ = fit("RoSA r=12 (random mask)", config_for(12), masks=random_masks)
_ = run.check("random_mask_keeps_k_entries_per_layer",
              all(int(layer.mask().sum()) == layer.k for layer in rosa.rosa_layers(random_model).values()))
overlap = sum(int((random_masks[n] & rosa12["masks"][n]).sum()) for n in random_masks) / sum(
    int(m.sum()) for m in random_masks.values())
r_gap = verdicts.mean_difference(losses["RoSA r=12, random mask"], losses["RoSA r=12"], what="test problems")
print(f"held-out loss: Fisher mask {mean(losses['RoSA r=12']):.3f}, random mask {mean(losses['RoSA r=12, random mask']):.3f}; "
      f"random minus Fisher = {r_gap}")
print(f"the random mask shares {100 * overlap:.2f}% of its entries with the Fisher mask (chance: the density)")
# Positive: the gradient-chosen entries are worth more than as many random ones (the paper's
# argument for the Fisher mask); an interval that straddles 0 means this short run cannot tell.
del random_model

# %% [markdown]
# ## 3. No warm-up: the mask from the gradients at W0
#
# With `warmup_fn=None` the squared gradients are taken at the pretrained weights, before LoRA has
# moved; we measure how many entries the two masks share and what it does to the held-out loss.

# %%
_, losses["RoSA r=12, no warm-up"], cold_masks = fit("RoSA r=12 (no warm-up)", config_for(12), warmup=False)
shared = sum(int((cold_masks[n] & rosa12["masks"][n]).sum()) for n in cold_masks) / sum(int(m.sum()) for m in cold_masks.values())
w_gap = verdicts.mean_difference(losses["RoSA r=12, no warm-up"], losses["RoSA r=12"], what="test problems")
print(f"the masks with and without warm-up share {100 * shared:.1f}% of their entries")
print(f"held-out loss without warm-up minus with = {w_gap}")
# The warm-up moves LoRA a little, and with it the gradients the mask is chosen from; the share of
# entries in common says how much (a random mask would share about the density), the loss difference
# whether that matters in this run. The paper's warm-up is 64 steps, ours a few.

# %% [markdown]
# ## 4. One budget, four splits
#
# r = 16 (LoRA alone), 12, 8 and 4, each with the rest of LoRA r = 16's budget as sparse entries.

# %%
splits = {}
for r in (16, 12, 8, 4):
    if r == 12:
        model, split_losses = rosa12["model"], losses["RoSA r=12"]
    else:
        model, split_losses, _ = fit(f"r={r} + sparse", config_for(r))
    splits[r] = dict(loss=mean(split_losses), losses=split_losses, trainable=core.count_parameters(model)[0])
    del model
del rosa12
print("trainable parameters: " + ", ".join(f"r={r}: {s['trainable']:,d}" for r, s in splits.items())
      + f" -> all equal (by construction of lora_budget_density): {len({s['trainable'] for s in splits.values()}) == 1}")
for r, s in splits.items():
    print(f"r = {r:2d} + {16 - r:2d}(d_in + d_out) sparse: held-out loss {s['loss']:.3f}, "
          f"minus LoRA r=16: {verdicts.mean_difference(s['losses'], splits[16]['losses'], what='test problems')}")

# %% [markdown]
# ## 5. What a step costs
#
# One optimizer step of LoRA r = 16 and of RoSA r = 12 + sparse on the same batch, the best of three
# (after one untimed step; one in the smoke profile). On a CPU the sparse products go through PyTorch's CSR kernels, one per
# layer and direction, on top of the dense model; `python -m bench.bench_rosa` measures it carefully
# (interleaved, memory too), and on a GPU the Triton SpMM/SDDMM run.

# %%
def step_time(config):
    model = core.add_adapter(copy.deepcopy(smol), config)
    if config.density_pattern:
        rosa.set_masks(model, {n: top_k_mask(torch.rand(l.shape, generator=g), l.k).to(run.torch_device)
                               for n, l in rosa.rosa_layers(model).items() if l.k})
    batch = fisher_batches[0]
    opt = torch.optim.AdamW([p for group in rosa.param_groups(model) for p in group["params"]], lr=1e-4)
    times = []
    for _ in range(1 + cfg["timed_steps"]):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step(), opt.zero_grad()
        if run.torch_device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


times = {"LoRA r=16": step_time(config_for(16)), "RoSA r=12": step_time(config_for(12))}
print(", ".join(f"{k}: {v:.2f} s/step" for k, v in times.items()) + f"; RoSA / LoRA = {times['RoSA r=12'] / times['LoRA r=16']:.2f}")

# %%
_ = run.save(metrics={"held_out_loss": {k: mean(v) for k, v in losses.items()},
                      "qrosa_minus_rosa": q_gap.to_dict(), "random_minus_fisher": r_gap.to_dict(),
                      "random_mask_overlap": overlap, "no_warmup_mask_shared": shared,
                      "no_warmup_minus_warmup": w_gap.to_dict(),
                      "splits": {str(r): {"loss": s["loss"], "trainable": s["trainable"]} for r, s in splits.items()},
                      "step_time_s": times, "layers": cfg["layers"] or 30})
