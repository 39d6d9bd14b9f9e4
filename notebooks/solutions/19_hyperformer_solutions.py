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
# # 19 · HyperFormer: solutions to the exercises
#
# The chapter's three tasks (SST-2, RTE, MRPC with their names in front of the inputs, `tasks.SST2`'s
# sizes and steps) and its HyperFormer++ configuration; exercise 3 trains it once, on the three at
# once, at 1e-3 (the top of the chapter's HyperFormer++ grid); exercise 4 at 1e-2 too.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import copy

import torch
from torch import nn

from peft_from_scratch import core, data, tasks   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import HoulsbyConfig, HyperFormerConfig, set_task
from peft_from_scratch.notebook import start
from peft_from_scratch.training import TrainConfig, train

run = start("19_hyperformer_solutions", profile, seed, results_dir)
names = ("sst2", "rte", "mrpc")
sizes_ = run.pick(smoke={}, cpu=dict(steps=32), gpu={})          # the chapter's: 32 steps per task on cpu
work = {n: cls.for_run(run, prefix=f"{n}: ", **sizes_) for n, cls in zip(names, (tasks.SST2, tasks.RTE, tasks.MRPC))}
minilm = work["sst2"].base()
for t in work.values():
    t.base()
pad = work["sst2"].tokenizer.pad_token_id

# %% [markdown]
# ## 1. The sampler's temperature
#
# $p_i \propto (n_i/N)^{1/T}$. The first 300 batches of each sampler, counted, beside the formula.

# %%
sets = {n: t.train_set for n, t in work.items()}
sizes = {n: len(s) for n, s in sets.items()}
freq = {}
for T in (1.0, 2.0, 10.0):
    sampler = data.MultiTaskBatches(sets, 2, temperature=T, seed=seed, pad_token_id=pad)
    it = iter(sampler)
    drawn = [next(it)["task"] for _ in range(300)]
    freq[T] = {n: drawn.count(n) / len(drawn) for n in names}
    print(f"T = {T:4g}: p = " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, sampler.probabilities.tolist()))
          + " | drawn: " + ", ".join(f"{n} {freq[T][n]:.3f}" for n in names))
expected = {T: [(n_ / sum(sizes.values())) ** (1 / T) for n_ in sizes.values()] for T in freq}
print("sizes:", sizes)
print("at T = 10 the largest task is drawn at most 1.3x as often as the smallest:",
      run.check("temperature_10_near_uniform", max(expected[10.0]) / min(expected[10.0]) < 1.3))

# %% [markdown]
# ## 2. How far from the identity it starts

# %%
batch = {k: v for k, v in next(iter(work["sst2"].loader(work["sst2"].val_set))).items() if k != "labels"}
with torch.no_grad():
    plain = minilm.bert(**batch).last_hidden_state
    gaps = {}
    for label, config in [("HyperFormer++", HyperFormerConfig(tasks=list(names), default_task="sst2")),
                          ("Houlsby adapter", HoulsbyConfig(m=12))]:
        adapted = core.add_adapter(copy.deepcopy(minilm), config)
        gaps[label] = ((adapted.bert(**batch).last_hidden_state - plain).abs().max() / plain.abs().max()).item()
        print(f"{label}: a fresh model's last hidden states move by {gaps[label]:.1e} of their size")
print("neither starts exactly at the pretrained function:", run.check("near_identity_both", all(g > 0 for g in gaps.values())))

# %% [markdown]
# Houlsby's branch is small because both its weights are ($10^{-2}$); HyperFormer's because the
# generated LayerNorm scales its output by $\gamma \approx N(0, 0.08^2)$ while $D$ and $U$ are not
# small. Both start near the pretrained model; which is nearer depends on $d$ and the init scales.

# %% [markdown]
# ## 3. A fourth task for free?

# %%
config = HyperFormerConfig(tasks=list(names), modules_to_save=["classifier"])
model = core.add_adapter(copy.deepcopy(minilm), config)
batches = data.MultiTaskBatches(sets, work["sst2"].batch, temperature=10, seed=seed, pad_token_id=pad)
train(model, batches, TrainConfig(lr=1e-3, max_steps=3 * work["sst2"].steps, seed=seed), desc="HyperFormer++, lr 0.001")
before = core.count_parameters(model)[0]
hn = model.hypernet
torch.manual_seed(seed)
hn.task_embeddings["new"] = nn.Parameter(torch.randn(64))    # an untrained z, as the init draws it
hn.task_names.append("new")
after = core.count_parameters(model)[0]
accuracy = {}
for z in ("sst2", "new"):
    set_task(model, z)
    c = work["sst2"].correct(model)
    accuracy[z] = sum(c) / len(c)
print(f"a new task adds {after - before} parameters; SST-2 accuracy with SST-2's z {accuracy['sst2']:.3f}, "
      f"with an untrained z {accuracy['new']:.3f} (majority {work['sst2'].majority():.3f})")
print("a new task costs exactly t = 64 parameters:", run.check("new_task_costs_64", after - before == 64))

# %% [markdown]
# The new task costs 64 numbers, but an untrained $z$ is a random point the hypernetwork never saw:
# what it generates is whatever adapter that point maps to. The paper trains new tasks' embeddings
# (and, for few-shot transfer, the hypernetwork too); the gap between the two accuracies above is
# what that training has to recover.

# %% [markdown]
# ## 4. The adapters' learning rate
#
# The same training at 1e-2 (exercise 3 trained at 1e-3), then the mean |γ| the hypernetwork
# generates over every layer and block for SST-2, and the accuracy on the three tasks.

# %%
def gamma_and_accuracy(model):
    set_task(model, "sst2")
    with torch.no_grad():
        gamma = torch.stack([model.hypernet.generate(layer, block).gamma.abs().mean()
                             for layer in range(minilm.config.num_hidden_layers) for block in (0, 1)]).mean().item()
    acc = {}
    for n, t in work.items():
        set_task(model, n)
        c = t.correct(model)
        acc[n] = sum(c) / len(c)
    return gamma, acc


fresh = core.add_adapter(copy.deepcopy(minilm), config)
gamma_init = gamma_and_accuracy(fresh)[0]
high = core.add_adapter(copy.deepcopy(minilm), config)
train(high, data.MultiTaskBatches(sets, work["sst2"].batch, temperature=10, seed=seed, pad_token_id=pad),
      TrainConfig(lr=1e-2, max_steps=3 * work["sst2"].steps, seed=seed), desc="HyperFormer++, lr 0.01")
set_task(model, "sst2")
gamma_low, acc_low = gamma_and_accuracy(model)
gamma_high, acc_high = gamma_and_accuracy(high)
print(f"mean |γ| at the init {gamma_init:.3f}, after training at 1e-3 {gamma_low:.3f}, at 1e-2 {gamma_high:.3f}")
print("accuracy at 1e-3:", ", ".join(f"{n} {a:.3f}" for n, a in acc_low.items()),
      "| at 1e-2:", ", ".join(f"{n} {a:.3f}" for n, a in acc_high.items()),
      "| majority:", ", ".join(f"{n} {t.majority():.3f}" for n, t in work.items()))
print("the larger rate moves the generated LayerNorm further from its init:",
      run.check("larger_rate_larger_gamma", abs(gamma_high - gamma_init) > abs(gamma_low - gamma_init)))

# %% [markdown]
# All of every layer's adapters come from the same generators, so an Adam step of size lr on a
# generator weight moves every adapter of the model; the LayerNorm inside each adapter turns the branch
# into a vector of size about |γ| added to the residual stream in every layer. Compare the accuracies
# with the majority class to see whether the model still reads its input.

# %%
_ = run.save(metrics={"frequencies": {str(k): v for k, v in freq.items()}, "sizes": sizes, "init_gaps": gaps,
                      "fourth_task": {"parameters": after - before, "accuracy": accuracy},
                      "learning_rate": {"gamma_init": gamma_init, "gamma_1e-3": gamma_low, "gamma_1e-2": gamma_high,
                                        "accuracy_1e-3": acc_low, "accuracy_1e-2": acc_high}})
