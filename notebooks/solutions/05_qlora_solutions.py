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
# # 05 · QLoRA: solutions to the exercises
#
# Each answer trains SmolLM2 on E2E NLG with the chapter's task (`tasks.E2E`: the same examples and
# test MRs), shortened in the cpu profile to 6 steps of 4 examples so that all seven runs fit in a few
# minutes: the answers are about directions, not the chapter's numbers. Held-out loss is the mean
# loss per test MR (`tasks.example_losses`), compared with a paired bootstrap over the same MRs.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import time

import torch

from peft_from_scratch import core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.optim import make_paged_adamw
from peft_from_scratch.quantized import linear4bit
from peft_from_scratch.quantized.qlora import prepare_qlora
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.training import TrainConfig, train

torch._dynamo.config.disable = True   # bitsandbytes is not used here, but keep the chapter's eager mode
run = start("05_qlora_solutions", profile, seed, results_dir)
task = tasks.E2E.for_run(run, **run.pick(smoke={}, cpu=dict(steps=6, batch=4, n_select=16, n_test=24), gpu={}))
grid = tasks.lrs(task, "adapter")
lr = grid[len(grid) // 2]                                        # the middle of the chapter's grid
all_linear = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
task.base()                                                      # loads the model and tokenizes the data
test_loader = task.loader(task.test_set)


def qlora_run(desc, config=all_linear, lr=lr, train_config=None, **prepare):
    model = prepare_qlora(task.base(), config, **prepare)
    if train_config is None:
        hist = task.fit(model, lr, desc=desc, make_optimizer=make_paged_adamw)
    else:   # the same data and steps, another schedule
        hist = train(model, task.loader(task.train_set, shuffle=True), train_config, desc=desc,
                     make_optimizer=make_paged_adamw)
    return dict(losses=tasks.example_losses(model, test_loader), select=task.select_loss(model), hist=hist,
                trained=core.count_parameters(model)[0])


def mean(xs):
    return sum(xs) / len(xs)


# %% [markdown]
# ## 1. NF4 vs FP4 vs Int4 under the adapter
#
# Notebook 04 found the held-out perplexity of the quantized *base* in the order NF4 < FP4 < Int4.
# Train the same LoRA on each base, same steps and rate:

# %%
by_type = {q: qlora_run(f"QLoRA on a {q} base", quant_type=q) for q in ("nf4", "fp4", "int4")}
for q, r in by_type.items():
    print(f"{q:5s}: test loss {mean(r['losses']):.3f}")
for other in ("fp4", "int4"):
    gap = verdicts.mean_difference(by_type["nf4"]["losses"], by_type[other]["losses"], what="test MRs")
    print(f"loss(nf4) - loss({other}) = {gap}  ({gap.method})")
order = sorted(by_type, key=lambda q: mean(by_type[q]["losses"]))
print("order after fine-tuning, best first:", " < ".join(order), "| notebook 04's order (nf4 < fp4 < int4) holds:",
      order == ["nf4", "fp4", "int4"])

# %% [markdown]
# A short run leaves most of the base's quantization error in place, which is why the order of the bases
# could carry over; whether it does here, and whether the intervals can tell the types apart at all, is
# printed above. In the paper (Figure 3, Table 3) NF4 beats FP4 after fine-tuning, on models 50-500x larger.
#
# ## 2. LoRA on q_proj and v_proj only, on the 4-bit base
#
# The paper's Figure 2: on a 4-bit base, LoRA on the attention's query and value projections alone
# does not reach 16-bit performance, LoRA on every linear layer does.

# %%
qv = qlora_run("QLoRA, LoRA on q_proj and v_proj", config=LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
gap_qv = verdicts.mean_difference(qv["losses"], by_type["nf4"]["losses"], what="test MRs")
print(f"q,v only: {qv['trained']:,d} trained, test loss {mean(qv['losses']):.3f}; all linear: "
      f"{by_type['nf4']['trained']:,d} trained, {mean(by_type['nf4']['losses']):.3f}")
print(f"loss(q,v) - loss(all linear) = {gap_qv}  ({gap_qv.method})")
print("q,v only is worse, as in the paper's Figure 2:", gap_qv.estimate > 0, "| the interval excludes 0:", gap_qv.low > 0)

# %% [markdown]
# With the same rank, q, v alone train a fraction of the parameters and adapt two of the seven
# projections; a positive gap is the paper's finding that the adapter has to reach every layer to make
# up for what the 4-bit base lost.
#
# ## 3. The QLoRA recipe's schedule
#
# The official `qlora.py` trains with a constant rate after 3% warm-up and clips gradients at norm 0.3
# (our default: linear decay after 10% warm-up, clipping at 1.0).

# %%
recipe = qlora_run("QLoRA, constant schedule, clip 0.3", train_config=TrainConfig(
    lr=lr, max_steps=task.steps, seed=task.seed, schedule="constant", warmup_ratio=0.03, max_grad_norm=0.3))
gap_schedule = verdicts.mean_difference(recipe["losses"], by_type["nf4"]["losses"], what="test MRs")
print(f"recipe's schedule: test loss {mean(recipe['losses']):.3f}; ours: {mean(by_type['nf4']['losses']):.3f}")
print(f"loss(recipe) - loss(ours) = {gap_schedule}  ({gap_schedule.method})")
print("learning rate per step, recipe:", [f"{x:.1e}" for x in recipe["hist"].lr])
print("learning rate per step, ours:  ", [f"{x:.1e}" for x in by_type["nf4"]["hist"].lr])

# %% [markdown]
# In a run of a few steps the schedule is most of the difference: 3% and 10% warm-up of a few steps both
# round up to one step at rate 0, then the constant schedule keeps the full rate where ours decays
# linearly to 0, so the recipe takes larger steps in total (the printed rates). Clipping at 0.3 only bites where the gradient norm exceeds it (see `hist.grad_norm`).
#
# ## 4. Gradient checkpointing off
#
# One training step each (same batch), timed, under `tasks.training_step_memory`:

# %%
batch = next(iter(task.loader(task.train_set, shuffle=True)))
step = {}
for checkpointing in (True, False):
    model = prepare_qlora(task.base(), all_linear, gradient_checkpointing=checkpointing)
    optimizer = make_paged_adamw([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=lr))
    t0 = time.perf_counter()
    live = tasks.training_step_memory(model, batch, optimizer)
    step[checkpointing] = dict(seconds=time.perf_counter() - t0, peak=live.peak, at_peak=live.at_peak,
                               dequantized=4 * sum(m.in_features * m.out_features for m in model.modules()
                                                   if isinstance(m, linear4bit.Linear4bit)))
MB = 2**20
for checkpointing, s in step.items():
    print(f"checkpointing {'on ' if checkpointing else 'off'}: {s['seconds']:.1f} s, peak {s['peak'] / MB:.0f} MB; at the peak, "
          + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in s["at_peak"].items()))
kept = (step[False]["at_peak"].get("forward", 0) - step[True]["at_peak"].get("forward", 0)) / MB
print(f"the forward pass keeps {kept:.0f} MB more without checkpointing; every 4-bit layer's weight in float32 is "
      f"{step[False]['dequantized'] / MB:.0f} MB")

# %%
print("without checkpointing the forward pass keeps more for the backward pass:",
      run.check("checkpointing_off_keeps_more_activations",
                step[False]["at_peak"].get("forward", 0) > step[True]["at_peak"].get("forward", 0)))

# %% [markdown]
# Without checkpointing each `Linear4bit` saves the input *and its dequantized float32 weight* for the
# backward pass (the gradient to the input is the output gradient times $W$), so the forward pass keeps
# up to the whole float model again: the 4-bit storage saves memory between steps, not during them.
# With checkpointing a block keeps only its input; the backward pass recomputes the block (one more
# forward: the step takes longer) and dequantizes its weights again. On a GPU, compare
# `torch.cuda.max_memory_allocated()` the same way. (bitsandbytes' own 4-bit matmul avoids the saved
# weight by dequantizing again in its backward; ours relies on checkpointing, as the recipe does.)
#
# ## 5. QLoRA's own learning rate
#
# The chapter trains QLoRA at the rate picked for float LoRA. Sweep QLoRA itself over the same grid,
# picked the same way (selection loss):

# %%
def fit_qlora(rate):
    r = by_type["nf4"] if rate == lr else qlora_run(f"QLoRA, lr {rate:g}", lr=rate)
    return r["select"], r


own_lr, own, own_sweep = tasks.pick_lr(fit_qlora, grid, higher_is_better=False)
print("QLoRA selection loss per lr: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in own_sweep.items()))
print(f"QLoRA's own pick: lr {own_lr:g} (test loss {mean(own['losses']):.3f})")

# %%
_ = run.save(metrics={
    "test_loss": {**{q: mean(r["losses"]) for q, r in by_type.items()}, "qv_only": mean(qv["losses"]),
                  "recipe_schedule": mean(recipe["losses"])},
    "gaps": {"qv_minus_all": gap_qv.to_dict(), "recipe_minus_ours": gap_schedule.to_dict()},
    "checkpointing": {str(k): {"seconds": v["seconds"], "peak_mb": v["peak"] / MB} for k, v in step.items()},
    "qlora_lr_sweep": {str(k): v for k, v in own_sweep.items()}, "qlora_lr": own_lr, "steps": task.steps,
})
