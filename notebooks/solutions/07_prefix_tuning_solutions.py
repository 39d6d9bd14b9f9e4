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
# # 07 · Prefix tuning: solutions to the exercises
#
# Each answer trains on the chapter's E2E task (`tasks.E2E` with the chapter's sizes: the same
# examples, batch and number of steps) at one learning rate, the middle of the chapter's grid, and
# compares held-out losses per test MR with a paired bootstrap, so the numbers can be set beside the
# chapter's.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import time

from peft_from_scratch import core, data, evaluate, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import PromptTuningConfig
from peft_from_scratch.additive.prefix_tuning import PrefixTuningConfig
from peft_from_scratch.notebook import start

import torch

run = start("07_prefix_tuning_solutions", profile, seed, results_dir)
e2e = tasks.E2E.for_run(run, **run.pick(smoke={}, cpu=dict(n_train=48, n_select=16, n_test=24, steps=6, batch=4), gpu={}))
smol = e2e.base()
tok = e2e.tokenizer
test_loader = e2e.loader(e2e.test_set)
LR = tasks.lrs(e2e, "adapter")[len(tasks.lrs(e2e, "adapter")) // 2]      # the middle of the chapter's grid
N = 10
mean = lambda xs: sum(xs) / len(xs)   # noqa: E731


def fit(config, desc, lr=LR, before_training=None):
    model = core.add_adapter(e2e.base(), config)
    if before_training is not None:
        before_training(model)
    e2e.fit(model, lr, desc=desc)
    return model, tasks.example_losses(model, test_loader)


mlp_model, mlp = fit(PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True), f"prefix n={N}, MLP h=192, lr {LR:g}")
print(f"zero-shot test loss {mean(tasks.example_losses(smol, test_loader)):.3f}; prefix n={N} through the MLP (h=192, "
      f"lr {LR:g}): {mean(mlp):.3f}")

# %% [markdown]
# ## 1. The direct prefix, initialised from a real instruction
#
# As in the chapter's section 1: run the frozen model on an instruction of $n$ = 10 tokens, copy its
# keys and values (every layer's) into the prefix, and train $P_\theta$ directly, without the MLP;
# against the direct prefix from peft's $\mathcal{N}(0, 1)$.

# %%
instruction = tok("Write one sentence describing the restaurant with every attribute given",
                  return_tensors="pt")["input_ids"][:, :N]


def from_instruction(model):
    with torch.no_grad():
        cache = smol(input_ids=instruction, use_cache=True).past_key_values
        kv = torch.stack([t[0] for lay in cache.layers for t in (lay.keys, lay.values)])   # (2L, kv_heads, n, hd)
        model.prompt_encoder.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(N, -1))


_, direct_random = fit(PrefixTuningConfig(num_virtual_tokens=N), f"direct prefix n={N}, N(0, 1) init")
real_model, direct_real = fit(PrefixTuningConfig(num_virtual_tokens=N), f"direct prefix n={N}, real-words init",
                              before_training=from_instruction)
gap_init = verdicts.mean_difference(direct_real, direct_random, what="test MRs")
gap_mlp = verdicts.mean_difference(direct_real, mlp, what="test MRs")
print(f"test loss: direct from N(0, 1) {mean(direct_random):.3f}, direct from a real instruction {mean(direct_real):.3f}, "
      f"through the MLP {mean(mlp):.3f}")
print(f"real-words init - N(0, 1) init: {gap_init};  real-words init - MLP: {gap_mlp}  ({gap_init.method})")
# The real-words start is a prefix the model already understands (its own cache), on the scale of real
# keys and values; N(0, 1) is neither. Whether it closes the gap to the MLP is the second interval:
# above 0 means the MLP still does better. Before training, that prefix must make the model continue
# exactly as it does after reading the instruction:
probe = core.add_adapter(e2e.base(), PrefixTuningConfig(num_virtual_tokens=N))
from_instruction(probe)
cont = tok(" The Eagle is a coffee shop.", return_tensors="pt")["input_ids"]
with torch.no_grad():
    same = torch.allclose(probe(input_ids=cont).logits, smol(input_ids=torch.cat([instruction, cont], 1)).logits[:, N:],
                          atol=1e-4)
print("the real-words prefix continues like the model reading the instruction (1e-4):",
      run.check("real_words_prefix_is_the_instructions_cache", same))
del probe

# %% [markdown]
# ## 2. The MLP's hidden width against the learning rate
#
# One factor at a time from the run above (h = 192, lr = the grid's middle): the paper's width,
# h = 512, at the same rate, and h = 192 at the grid's largest rate.

# %%
LR_HIGH = max(tasks.lrs(e2e, "adapter"))
_, wide = fit(PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=512),
              f"prefix n={N}, MLP h=512, lr {LR:g}")
if LR_HIGH == LR:          # the smoke profile's grid has one rate
    fast = mlp
else:
    _, fast = fit(PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True), f"prefix n={N}, MLP h=192, lr {LR_HIGH:g}",
                  lr=LR_HIGH)
width_effect = verdicts.mean_difference(wide, mlp, what="test MRs")
lr_effect = verdicts.mean_difference(fast, mlp, what="test MRs")
print(f"h 192 -> 512 at lr {LR:g}: test loss {mean(mlp):.3f} -> {mean(wide):.3f}, change {width_effect}")
print(f"lr {LR:g} -> {LR_HIGH:g} at h 192: test loss {mean(mlp):.3f} -> {mean(fast):.3f}, change {lr_effect}")
print("the larger effect here:", "the learning rate" if abs(lr_effect.estimate) > abs(width_effect.estimate) else "the width")

# %% [markdown]
# ## 3. Prompt tuning with the folded prefix's budget
#
# The folded prefix keeps $n \cdot 2L \cdot w$ numbers; a soft prompt has $p \cdot d$. Equal budgets
# mean $p = 2 n L w / d$ virtual tokens: 200 on SmolLM2 (n = 10, L = 30, w = 192, d = 576). Every
# example then runs through the model with 200 more positions, while the prefix adds nothing to the
# sequence (only to the keys and values).

# %%
cfg = smol.config
L, d = cfg.num_hidden_layers, cfg.hidden_size
w = cfg.num_key_value_heads * d // cfg.num_attention_heads
p = 2 * N * L * w // d
prompt_model, prompt = fit(PromptTuningConfig(num_virtual_tokens=p, init="vocab"), f"prompt tuning p={p} (the prefix's budget)")
n_prompt = core.count_parameters(prompt_model)[0]
print(f"prompt tuning, p = {p}: {n_prompt:,d} parameters; folded prefix: {N * 2 * L * w:,d}"
      + ("" if L == 30 else f" (the smoke profile's {L} layers do not divide evenly)"))
print(f"test loss: prompt {mean(prompt):.3f}, prefix through the MLP {mean(mlp):.3f}; "
      f"prompt - prefix {verdicts.mean_difference(prompt, mlp, what='test MRs')}")

# %% [markdown]
# ## 4. Prefix length
#
# n = 1, 5, 20 through the MLP at the same rate, beside n = 10 from above.

# %%
lengths = {N: mlp}
for n in run.pick(smoke=(5,), cpu=(1, 5, 20), gpu=(1, 5, 20, 50)):
    lengths[n] = fit(PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=True), f"prefix n={n}, MLP")[1]
lengths = dict(sorted(lengths.items()))
for n, losses in lengths.items():
    print(f"n = {n:2d}: test loss {mean(losses):.3f}")
best = min(lengths, key=lambda n: mean(lengths[n]))
print(f"lowest test loss at n = {best}; n = {best} minus n = 10: {verdicts.mean_difference(lengths[best], mlp, what='test MRs')}")

# %% [markdown]
# ## 5. Generation speed with and without a prefix
#
# Greedy decoding of the same test MRs, as many new tokens each time, from the frozen model and
# from the model with the trained n = 10 prefix. The prefix makes every layer's cache n entries
# longer from the first step: a little more attention per new token, nothing else.

# %%
prompts = [data.e2e_example(r)[0] for r in e2e.test_rows.select(range(min(8, e2e.n_test)))]


def seconds(model):
    t = time.perf_counter()
    evaluate.generate(model, tok, prompts, max_new_tokens=e2e.new_tokens)
    return time.perf_counter() - t


plain_s, prefix_s = seconds(smol), seconds(mlp_model)
print(f"{len(prompts)} MRs, up to {e2e.new_tokens} new tokens: frozen model {plain_s:.1f} s, with the prefix {prefix_s:.1f} s "
      f"(ratio {prefix_s / plain_s:.2f}; answers stop at different lengths, so this also measures how long they are)")

# %%
_ = run.save(metrics={"lr": LR, "test_loss": {"mlp_h192": mean(mlp), "mlp_h512": mean(wide), "mlp_h192_lr_high": mean(fast),
                                              "direct_random": mean(direct_random), "direct_real_words": mean(direct_real),
                                              "prompt_same_budget": mean(prompt)},
                      "lengths": {str(n): mean(v) for n, v in lengths.items()}, "prompt_tokens": p,
                      "generation_s": {"frozen": plain_s, "prefix": prefix_s}})
