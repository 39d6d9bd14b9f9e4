# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · LOMO and AdaLomo: solutions to the exercises
#
# Every answer trains or measures SmolLM2 on the chapter's E2E task (`tasks.E2E`, the chapter's
# sizes). Memory is measured with `training.memory.measure_step`, as in the chapter: tensors alive
# at the peak of one step, after one unmeasured step.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import time

from peft_from_scratch import tasks   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.optim import LomoStep
from peft_from_scratch.training import TrainConfig, train
from peft_from_scratch.training.memory import measure_step

import torch
from torch import nn

run = start("10_lomo_adalomo_solutions", profile, seed, results_dir)
task = tasks.E2E.for_run(run, **run.pick(smoke={}, cpu=dict(n_train=48, n_select=16, n_test=24, steps=6, batch=4), gpu={}))
smol = task.base()
batches = list(task.loader(task.train_set, shuffle=True))
MB = 2**20
n_steps = run.pick(smoke=2, cpu=3, gpu=5)


def lomo_steps(max_grad_norm, lr=0.1):
    """n_steps LOMO steps at a constant rate; returns the model and the seconds per step."""
    model = task.base()
    config = TrainConfig(lr=lr, max_grad_norm=max_grad_norm, warmup_ratio=0.0, schedule="constant", max_steps=n_steps,
                         seed=seed, device="cpu")
    with LomoStep() as step:
        start_time = time.perf_counter()
        train(model, batches[:n_steps], config, step=step, progress=False)
    return model, (time.perf_counter() - start_time) / n_steps


# %% [markdown]
# ## 1. What clipping costs and changes
#
# With `max_grad_norm` set, LOMO back-propagates twice (the norm, then the update); without it once.
# The time per step shows the cost; the distance each run moved from the pretrained weights shows
# how much the clipping changed (clipped at norm 1, a step moves the weights by at most lr).

# %%
clipped, t_clipped = lomo_steps(1.0)
unclipped, t_unclipped = lomo_steps(None, lr=0.1)
moved = {name: sum((p - q).norm() ** 2 for p, q in zip(m.parameters(), smol.parameters())) ** 0.5
         for name, m in (("clipped", clipped), ("unclipped", unclipped))}
print(f"seconds per step: {t_clipped:.2f} with clipping (two backward passes), {t_unclipped:.2f} without "
      f"(ratio {t_clipped / t_unclipped:.2f})")
print(f"distance moved from the pretrained weights after {n_steps} steps at lr 0.1: clipped {moved['clipped']:.3g}, "
      f"unclipped {moved['unclipped']:.3g}")
print(f"(clipped at norm 1, each step moves at most lr = 0.1, so at most {0.1 * n_steps:.1f} in all)")
_ = run.check("clipped_moves_at_most_lr_per_step", bool(moved["clipped"] <= 0.1 * n_steps * (1 + 1e-4)))
del clipped, unclipped

# %% [markdown]
# ## 2. Why LOMO cannot accumulate gradients
#
# Accumulation sums the gradients of several micro-batches before one update: the sum must be kept
# between backward passes, which is the full set of gradients LOMO exists not to store. The step
# refuses, with the reason, before touching the model. A larger batch is the alternative; its
# price is activations, which grow with the batch (measured below).

# %%
model = task.base()
try:
    train(model, batches[:2], TrainConfig(lr=0.1, grad_accum=2, max_steps=1, device="cpu"), step=LomoStep(), progress=False)
    refused = False
except ValueError as e:
    refused = True
    print("ValueError:", e)
untouched = all(torch.equal(p, q) for p, q in zip(model.parameters(), smol.parameters()))
_ = run.check("lomo_refuses_accumulation_model_untouched", refused and untouched)

half = {k: v[: max(1, len(v) // 2)] for k, v in batches[0].items()}
by_batch = {}
for label, b in (("half batch", half), ("full batch", batches[0])):
    with LomoStep() as step:
        by_batch[label] = measure_step(task.base(), [b], step, TrainConfig(lr=0.1, device="cpu"))
    print(f"{label} {tuple(b['input_ids'].shape)}: activations {by_batch[label].at_peak['activations'] / MB:.0f} MB, "
          f"peak {by_batch[label].peak / MB:.0f} MB")

# %% [markdown]
# ## 3. LOMO with gradient checkpointing
#
# The paper combines LOMO with activation checkpointing: each decoder block keeps only its input
# and recomputes the rest in the backward pass. The activations part shrinks; what is left of the
# peak is the weights and the moment's gradient.

# %%
def checkpointed(model):
    model.config.use_cache = False          # a KV cache is for generation; transformers warns beside checkpointing
    enable = getattr(model, "activation_checkpointing_enable", None)     # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


plain = by_batch["full batch"]
with LomoStep() as step:
    ckpt = measure_step(checkpointed(task.base()), [batches[0]], step, TrainConfig(lr=0.1, device="cpu"))
for label, m in (("no checkpointing", plain), ("checkpointing", ckpt)):
    parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in m.at_peak.items())
    print(f"{label:17s} peak {m.peak / MB:.0f} MB: {parts}")
_ = run.check("checkpointing_keeps_fewer_activations", ckpt.at_peak["activations"] < plain.at_peak["activations"])

# %% [markdown]
# ## 4. Untying the output head
#
# SmolLM2's output head is its embedding matrix, so that one parameter gets two gradient
# contributions (from the head and from the lookup), which autograd adds before the parameter's
# hook runs. With the head as its own parameter (a copy of the same weights), each part is its own
# parameter's gradient, applied and freed separately. Does the most gradient memory alive at once
# change, and what does the untied copy cost in weights?

# %%
untied = task.base()
untied.lm_head.weight = nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
untied.config.tie_word_embeddings = False
largest = untied.model.embed_tokens.weight.numel() * 4
with LomoStep() as step:
    m_untied = measure_step(untied, [batches[0]], step, TrainConfig(lr=0.1, device="cpu"))
tied_most = plain.most["gradients"]
print(f"most gradient bytes alive at once: tied {tied_most / MB:.0f} MB ({tied_most / largest:.2f} x the embedding), "
      f"untied {m_untied.most['gradients'] / MB:.0f} MB ({m_untied.most['gradients'] / largest:.2f} x)")
print(f"peak of the step: tied {plain.peak / MB:.0f} MB, untied {m_untied.peak / MB:.0f} MB; weights "
      f"{plain.after['weights'] / MB:.0f} MB tied, {m_untied.after['weights'] / MB:.0f} MB untied (the head's copy)")
print("at most one embedding-sized gradient is held at once, tied or untied:",
      max(tied_most, m_untied.most["gradients"]) <= largest)

# %%
_ = run.save(metrics={
    "seconds_per_step": {"clipped": t_clipped, "unclipped": t_unclipped},
    "activations_mb": {label: m.at_peak["activations"] / MB for label, m in by_batch.items()},
    "checkpointing_mb": {"plain": {k: v / MB for k, v in plain.at_peak.items()},
                         "checkpointed": {k: v / MB for k, v in ckpt.at_peak.items()}},
    "most_gradients_mb": {"tied": tied_most / MB, "untied": m_untied.most["gradients"] / MB},
})
