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
# # 06 · Houlsby adapters: solutions to the exercises
#
# Each answer trains MiniLM on the chapter's SST-2 task (`tasks.SST2`: the same sentences, steps and
# batch) at one learning rate, the middle of the chapter's adapter grid, and compares it with Houlsby
# adapters at m = 64 trained the same way: paired bootstrap intervals over the validation sentences.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import time

import torch

from peft_from_scratch import core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive.houlsby import HoulsbyConfig
from peft_from_scratch.notebook import start

run = start("06_houlsby_adapters_solutions", profile, seed, results_dir)
sst = tasks.SST2.for_run(run)
grid = tasks.lrs(sst, "adapter")
lr = grid[len(grid) // 2]


def fit(desc, **config):
    model = core.add_adapter(sst.base(), HoulsbyConfig(**{"m": 64, "modules_to_save": ["classifier"], **config}))
    hist = sst.fit(model, lr, desc=f"SST-2 {desc}, lr {lr:g}")
    return dict(model=model, correct=sst.correct(model), loss=hist.loss, trained=core.count_parameters(model)[0])


def accuracy(r):
    return sum(r["correct"]) / len(r["correct"])


def against(r, ref, name):
    gap = verdicts.mean_difference(r["correct"], ref["correct"], what="validation sentences")
    print(f"{name}: accuracy {accuracy(r):.3f} ({r['trained']:,d} trained); minus Houlsby m=64: {gap}")
    return gap


houlsby = fit("Houlsby m=64 (init std 1e-2)")
print(f"Houlsby m=64, the reference of every answer: accuracy {accuracy(houlsby):.3f}, {houlsby['trained']:,d} trained")

# %% [markdown]
# ## 1. The initial scale
#
# The paper reports that adapters train well for init std up to about $10^{-2}$ and degrade above. At
# std $10^{-1}$ the branch is no longer small (notebook: $|A(h) - h|/|h| \approx 0.6$), so training starts
# far from the pretrained network; at $10^{-3}$ it starts closer to it than at $10^{-2}$.

# %%
by_std = {std: fit(f"Houlsby m=64, init std {std:g}", init_std=std) for std in (1e-1, 1e-3)}
gaps_std = {std: against(r, houlsby, f"init std {std:g}") for std, r in by_std.items()}
for std, r in by_std.items():
    print(f"init std {std:g}: first training losses {[round(x, 3) for x in r['loss'][:3]]} "
          f"(std 1e-2: {[round(x, 3) for x in houlsby['loss'][:3]]})")
print("std 1e-1 is worse than 1e-2:", gaps_std[1e-1].estimate < 0, "| the interval excludes 0:", gaps_std[1e-1].high < 0)
print("std 1e-3 and 1e-2 cannot be told apart (the interval contains 0):", gaps_std[1e-3].low <= 0 <= gaps_std[1e-3].high)

# %% [markdown]
# What the paper predicts: a large initial branch (std $10^{-1}$) perturbs the features the head reads
# before any training, so it should start worse; $10^{-2}$ and $10^{-3}$ both start essentially at the
# identity and should be indistinguishable. The two lines above say what this run finds.
#
# ## 2. Frozen LayerNorms

# %%
frozen_ln = fit("Houlsby m=64, LayerNorms frozen", train_layer_norms=False)
gap_ln = against(frozen_ln, houlsby, "LayerNorms frozen")
no_norm_trains = not any("LayerNorm" in n for n, p in frozen_ln["model"].named_parameters() if p.requires_grad)
n_norms = houlsby["trained"] - frozen_ln["trained"]
print(f"the LayerNorms: {n_norms:,d} parameters, {100 * n_norms / sum(p.numel() for p in sst.base().parameters()):.3f}% of MiniLM")

# %%
print("with train_layer_norms=False no LayerNorm parameter trains:", run.check("layer_norms_frozen_when_asked", no_norm_trains))

# %% [markdown]
# The LayerNorms are a tiny share of the parameters (printed above) but rescale every feature the next
# layer reads; the gap above says what they add at this budget.
#
# ## 3. The parallel placement (He et al. 2022)

# %%
parallel = fit("parallel m=64", placement="parallel")
gap_parallel = against(parallel, houlsby, "parallel m=64")
pfeiffer = fit("Pfeiffer m=64", placement="pfeiffer")
gap_pfeiffer = against(pfeiffer, houlsby, "Pfeiffer m=64")

# %% [markdown]
# The parallel adapter reads the feed-forward block's input and adds to its output, one per layer: half
# Houlsby's adapter parameters, as Pfeiffer's. He et al. find parallel placement at least as good as
# sequential on their tasks; the intervals say whether SST-2 at this budget can tell.
#
# ## 4. Adapters only in the upper three layers

# %%
upper = fit("Houlsby m=64, layers 3-5 only", target_modules=r".*layer\.[3-5]\.(attention\.output\.dense|output\.dense)")
gap_upper = against(upper, houlsby, "adapters in layers 3-5 only")
print("adapted layers:", sorted({n.split(".")[3] for n in core.adapter_layers(upper["model"])}))

# %% [markdown]
# The paper's ablation (its Figure 6) removes adapters from ranges of layers of a trained model and
# finds that the lower layers' adapters matter least. Training without them from the start is the
# cheaper version: a small gap means the upper adapters carry most of what is learned.
#
# ## 5. The inference cost

# %%
batch = {k: v for k, v in next(iter(sst.loader(sst.val_set))).items() if k != "labels"}
plain = sst.base().eval()
adapted = houlsby["model"].eval()


def best_of(model, repeats=run.pick(smoke=2, cpu=5, gpu=5)):
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return min(times)


t_plain, t_adapted = best_of(plain), best_of(adapted)
print(f"one forward pass of {batch['input_ids'].shape[0]} sentences: plain {1000 * t_plain:.0f} ms, "
      f"with adapters {1000 * t_adapted:.0f} ms ({t_adapted / t_plain:.2f}x)")
print("the adapters cannot be merged:", HoulsbyConfig.mergeable)

# %% [markdown]
# The adapters add 24 small matrix products per token (two per adapter, twelve adapters) and a GELU each:
# the ratio above is their price at inference (timing on a shared CPU is noisy; `bench/` measures properly). LoRA's
# $BA$ folds into $W$ after training and costs nothing; the bottleneck has a GELU between its two
# matrices, so there is no single matrix to fold.

# %%
_ = run.save(metrics={
    "accuracy": {"houlsby_m64": accuracy(houlsby), **{f"init_std_{k:g}": accuracy(r) for k, r in by_std.items()},
                 "layer_norms_frozen": accuracy(frozen_ln), "parallel_m64": accuracy(parallel),
                 "pfeiffer_m64": accuracy(pfeiffer), "upper_layers_only": accuracy(upper)},
    "gaps": {"init_std_0.1": gaps_std[1e-1].to_dict(), "init_std_0.001": gaps_std[1e-3].to_dict(),
             "layer_norms_frozen": gap_ln.to_dict(), "parallel": gap_parallel.to_dict(),
             "pfeiffer": gap_pfeiffer.to_dict(), "upper_only": gap_upper.to_dict()},
    "forward_ms": {"plain": 1000 * t_plain, "adapters": 1000 * t_adapted}, "lr": lr, "steps": sst.steps,
})
