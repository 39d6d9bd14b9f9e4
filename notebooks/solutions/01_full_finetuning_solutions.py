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
# # 01 · Full fine-tuning: solutions to the exercises
#
# Each answer runs on the chapter's SST-2 task (`tasks.SST2`: the same sentences, batch and number of
# steps) at the learning rate the chapter's sweep picked (`tasks.full_finetuning_sst2`, read from the
# run's results folder when the chapter ran first, computed otherwise), so its numbers sit beside the
# chapter's.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
from peft_from_scratch import tasks, verdicts   # first: it quiets tqdm.auto's warning

import torch

from peft_from_scratch.core import count_parameters
from peft_from_scratch.notebook import start
from peft_from_scratch.training import TrainConfig, train

run = start("01_full_finetuning_solutions", profile, seed, results_dir)
sst = tasks.SST2.for_run(run)
full = tasks.full_finetuning_sst2(sst, run.results_dir)
lr = full["lr"]
print(f"the chapter's full fine-tuning: lr {lr:g}, validation accuracy {full['accuracy']:.3f} "
      f"({sst.steps} steps of {sst.batch})")

# %% [markdown]
# ## 1. Warm-up is part of the recipe too
#
# The chapter's Adam, with and without the bias correction (the same few lines), trained at the
# picked learning rate with and without the 10% warm-up. `train` takes the whole `TrainConfig`, so
# `warmup_ratio=0` is one argument.

# %%
class Adam(torch.optim.Optimizer):
    """AdamW with (``bias_correction=True``) or without (BERTAdam) Adam's bias correction."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bias_correction = bias_correction

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr_t, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, m, v, g = state["t"], state["m"], state["v"], p.grad
                p.mul_(1 - lr_t * group["weight_decay"])
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if self.bias_correction else (m, v)
                p.addcdiv_(m_hat, v_hat.sqrt() + eps, value=-lr_t)


def fit(warmup_ratio: float, bias_correction: bool):
    model = sst.base()
    make = lambda params, config: Adam(params, lr=config.lr, bias_correction=bias_correction)  # noqa: E731
    hist = train(model, sst.loader(sst.train_set, shuffle=True),
                 TrainConfig(lr=lr, max_steps=sst.steps, seed=sst.seed, warmup_ratio=warmup_ratio),
                 make_optimizer=make, desc=f"warm-up {warmup_ratio:g}, bias correction {bias_correction}")
    return sst.correct(model), hist


grid = {(w, bc): fit(w, bc) for w in (0.1, 0.0) for bc in (True, False)}
majority = sst.majority()
for (w, bc), (correct, hist) in grid.items():
    print(f"warm-up {w:>3g}, bias correction {str(bc):5s}: accuracy {sum(correct) / len(correct):.3f} "
          f"(majority {majority:.3f}); loss over the first 5 steps {[round(x, 3) for x in hist.loss[:5]]}")
worst = min(grid, key=lambda k: sum(grid[k][0]))
print(f"the worst combination: warm-up {worst[0]:g}, bias correction {worst[1]}")
gap = verdicts.mean_difference(grid[(0.1, True)][0], grid[(0.0, False)][0], what="validation sentences")
print(f"accuracy(the recipe) - accuracy(no warm-up, no correction) = {gap}  ({gap.method})")
# With warm-up the first step has lr 0 and the next ones are small, which hides part of the
# uncorrected Adam's oversized early steps; without it, the first steps run at the full lr times
# the chapter's factor (3.2 at step 1, above 6 around step 12): the combination Mosbach et al. warn of.
_ = run.check("no_warmup_starts_at_full_lr", grid[(0.0, True)][1].lr[0] == lr and grid[(0.1, True)][1].lr[0] == 0.0)

# %% [markdown]
# ## 2. How much is the head? A linear probe
#
# Freeze everything but `classifier` (384 x 2 + 2 = 770 weights) and sweep its learning rate the way
# the chapter swept full fine-tuning's, picked on the selection split.

# %%
def probe(lr_probe):
    model = sst.base()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    sst.fit(model, lr_probe, desc=f"linear probe, lr {lr_probe:g}")
    return sum(sst.correct(model, "select")) / sst.n_select, (sst.correct(model), count_parameters(model)[0])


probe_lr, (probe_correct, probe_trainable), probe_sweep = tasks.pick_lr(probe, run.pick(smoke=(1e-2,), cpu=(1e-3, 1e-2, 1e-1),
                                                                                      gpu=(1e-3, 1e-2, 1e-1)))
print("probe sweep (selection accuracy): " + ", ".join(f"{k:g}: {v:.3f}" for k, v in probe_sweep.items()))
probe_gap = verdicts.mean_difference(full["correct"], probe_correct, what="validation sentences")
print(f"linear probe ({probe_trainable} weights, lr {probe_lr:g}): accuracy {sum(probe_correct) / len(probe_correct):.3f}; "
      f"full fine-tuning {full['accuracy']:.3f}; full minus probe = {probe_gap}")
# all-MiniLM-L6-v2 was trained for sentence similarity, not sentiment: whatever the probe gains over
# the majority class its [CLS] vector already carried, and the gap to full fine-tuning (with its
# interval) is what training the encoder itself buys in this many steps.
_ = run.check("probe_trains_only_the_head", probe_trainable == 384 * 2 + 2)

# %% [markdown]
# ## 3. When does the correction stop mattering?
#
# BERTAdam's step is larger than Adam's by $f(t) = (1-\beta_1^t)/\sqrt{1-\beta_2^t}$. It falls towards
# 1 as $1/\sqrt{1-\beta_2^t}$ does, that is on the time scale $1/(1-\beta_2)$ steps: 1,000 for
# $\beta_2 = 0.999$, 50 for $\beta_2 = 0.98$.

# %%
def settles(beta2, beta1=0.9, within=0.1, horizon=100_000):
    t = torch.arange(1, horizon + 1, dtype=torch.float64)
    f = (1 - beta1 ** t) / (1 - beta2 ** t).sqrt()
    outside = (f - 1).abs() > within
    return int(outside.nonzero().max()) + 2, f          # the first step after the last one outside


for beta2 in (0.999, 0.98):
    t, f = settles(beta2)
    print(f"beta2 = {beta2}: the uncorrected step stays within 10% of the corrected one from step {t:,d} on "
          f"(largest factor {f.max():.2f}, at step {int(f.argmax()) + 1})")
# RoBERTa's beta2 = 0.98 makes v forget faster: its bias (and so the missing correction) is gone
# after about a hundred steps rather than a few thousand, and the largest factor is far smaller
# (printed above), so a fine-tuning run of a few hundred steps barely notices the correction.
t_bert, _ = settles(0.999)
_ = run.check("bert_beta2_settles_after_a_thousand_steps", 1000 < t_bert < 10_000)

# %%
_ = run.save(metrics={
    "warmup_grid": {f"warmup_{w:g}_bc_{bc}": sum(c) / len(c) for (w, bc), (c, _) in grid.items()},
    "probe": {"lr": probe_lr, "accuracy": sum(probe_correct) / len(probe_correct), "trainable": probe_trainable,
              "full_minus_probe": probe_gap.to_dict()},
    "settles_after": {"0.999": t_bert, "0.98": settles(0.98)[0]},
})
