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
# # 12 · FLORA: solutions to the exercises
#
# Every answer uses SmolLM2 and the chapter's E2E task (`tasks.E2E`, the chapter's sizes): real
# gradients of single training examples for the last decoder layer's q_proj (576 × 576), LoRA
# trained as in the chapter, and the library's `Flora` and `FloraAccumulationStep`.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import math

from peft_from_scratch import core, tasks   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.optim import Flora, FloraAccumulationStep
from peft_from_scratch.optim.flora import down, next_seed, projection, split_seed, up
from peft_from_scratch.reparameterized import LoRAConfig
from peft_from_scratch.training import BackpropStep, TrainConfig

import torch
from IPython.display import Markdown, display

run = start("12_flora_solutions", profile, seed, results_dir)
task = tasks.E2E.for_run(run, **run.pick(smoke={}, cpu=dict(n_train=48, n_select=16, n_test=24, steps=6, batch=4), gpu={}))
smol = task.base()
T = run.pick(smoke=4, cpu=24, gpu=48)
rows16 = [b for b in task.loader(task.train_set)]
examples = [{k: v[i:i + 1] for k, v in b.items()} for b in rows16 for i in range(len(b["input_ids"]))][:T]

W_q = smol.model.layers[-1].self_attn.q_proj.weight
smol.requires_grad_(False)
W_q.requires_grad_(True)
grads = []
for ex in examples:                              # the backward pass stops at the last layer
    smol(**ex).loss.backward()
    grads.append(W_q.grad.detach().clone())
    W_q.grad = None
W_q.requires_grad_(False)
shape, m = W_q.shape, W_q.shape[1]


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


# %% [markdown]
# ## 1. How noisy is one decompression?
#
# For P (m × r) with entries N(0, 1/r), E[P Pᵀ] = I, and a short computation with the fourth
# moments of a Gaussian gives E‖G P Pᵀ − G‖² = ((m + 1)/r) ‖G‖²: the relative error of one
# decompression is about √((m + 1)/r), larger than 1 for every r < m. The mean of K independent
# decompressions divides the variance by K: the error falls as 1/√K. Resampling is what lets FLORA
# use these noisy single estimates: over a run their errors average out.

# %%
G = grads[0]
table = ["| r | one decompression: ‖up(down(G)) − G‖ / ‖G‖ | √((m+1)/r) | mean of K = 16 | √((m+1)/(16 r)) |",
         "|---|---|---|---|---|"]
ratios, single = [], []
for r in (8, 32, 128, 576):
    Ps = [projection(s, shape, r, "cpu", torch.float32) for s in range(16)]
    one = rel(up(down(G, Ps[0]), Ps[0], shape), G)
    mean16 = rel(sum(up(down(G, P), P, shape) for P in Ps) / len(Ps), G)
    theory = math.sqrt((m + 1) / r)
    single.append(one / theory)                 # one draw: a sample of a spread-out error
    ratios.append(mean16 / (theory / 4))        # 16 draws: close to the expectation
    table.append(f"| {r} | {one:.2f} | {theory:.2f} | {mean16:.2f} | {theory / 4:.2f} |")
display(Markdown("\n".join(table) + f"\n\nG: the gradient of q_proj {tuple(shape)} for one E2E example."))
_ = run.check("decompression_error_follows_theory", all(0.8 < x < 1.2 for x in ratios) and all(0.5 < x < 1.5 for x in single))

# %% [markdown]
# ## 2. LoRA trained with SGD: A stays (much) closer to A₀
#
# The paper's argument is for plain gradient steps: dA = s Bᵀ G is zero at the first step (B₀ = 0)
# and stays small while B is small, so A hardly moves. Adam rescales each entry's gradient by its
# own running RMS: once B is non-zero, A's small gradient is blown up to steps of about lr per
# entry, as large as B's. We train the chapter's LoRA (r = 8 on q and v of the last layers) both
# ways, on the same batches; SGD gets a larger rate (the task clips the gradient to norm 1).

# %%
n_layers = len(smol.model.layers)
top = list(range(max(0, n_layers - run.pick(smoke=1, cpu=4, gpu=8)), n_layers))
pattern = rf"model\.layers\.({'|'.join(map(str, top))})\.self_attn\.(q_proj|v_proj)"
moved = {}
for name, lr, step in (("AdamW", 1e-3, None),
                       ("SGD", 0.1, BackpropStep(lambda params, c: torch.optim.SGD(params, lr=c.lr)))):
    model = core.add_adapter(task.base(), LoRAConfig(r=8, alpha=16, target_modules=pattern))
    layers = {n: mod for n, mod in model.named_modules() if hasattr(mod, "lora")}
    A0 = {n: mod.lora.A.detach().clone() for n, mod in layers.items()}
    B0 = {n: mod.lora.B.detach().clone() for n, mod in layers.items()}
    task.fit(model, lr, desc=f"E2E LoRA r=8, {name}, lr {lr:g}", **({"step": step} if step else {}))
    moved[name] = {"A": max(rel(mod.lora.A.detach(), A0[n]) for n, mod in layers.items()),
                   "B": max((mod.lora.B.detach() - B0[n]).norm().item() for n, mod in layers.items())}
    del model, layers
for name, v in moved.items():
    print(f"{name:5s}: A moved by at most {v['A']:.2%} of ‖A₀‖; the largest ‖B_T‖ {v['B']:.3g}")
_ = run.check("sgd_moves_A_less_than_adam", moved["SGD"]["A"] <= moved["AdamW"]["A"])

# %% [markdown]
# ## 3. Sweeping κ
#
# The same T gradients through the library's `Flora` (r = 8) for several κ: the rank of the summed
# decompressed momentum Σ up(Mₜ) is at most r per projection the run sees, and Algorithm 1's sum
# Σ up(down(Gₜ)) gets closer to Σ Gₜ as independent errors average out. Does the rank grow with
# the number of projections? The table also shows the size of the momentum at the end, ‖M_T‖.

# %%
R = 8


def numerical_rank(X, rel_tol=1e-5):
    s = torch.linalg.svdvals(X.double())
    return int((s > rel_tol * s[0]).sum())


true_sum = sum(grads)
table = ["| κ | projections seen | rank of Σ up(Mₜ) | r × projections | ‖Σ up(down(Gₜ)) − Σ Gₜ‖ / ‖Σ Gₜ‖ | ‖M_T‖ |",
         "|---|---|---|---|---|---|"]
kappa_ranks, momentum_norm = {}, {}
for kappa in sorted({1, 2, max(1, T // 6), max(1, T // 2), 10 * T}):
    W = torch.nn.Parameter(W_q.detach().clone())
    opt, total, seen = Flora([W], lr=1e-3, rank=R, kappa=kappa, beta1=0.9, seed=seed), 0, set()
    for Gt in grads:
        W.grad = Gt.clone()
        opt.step()
        s = opt.state[W]["seed"]
        seen.add(s)
        total = total + up(opt.state[W]["exp_avg"], projection(split_seed(s)[1], shape, R, "cpu", torch.float32), shape)
    seeds = [seed + 101]
    while len(seeds) <= T // kappa:
        seeds.append(next_seed(seeds[-1]))
    alg1 = sum(up(down(Gt, P), P, shape) for t, Gt in enumerate(grads)
               for P in [projection(seeds[t // kappa], shape, R, "cpu", torch.float32)])
    kappa_ranks[kappa] = (numerical_rank(total), len(seen))
    momentum_norm[kappa] = opt.state[W]["exp_avg"].norm().item()
    table.append(f"| {kappa} | {len(seen)} | {numerical_rank(total)} | {R * len(seen)} | {rel(alg1, true_sum):.2f} | "
                 f"{momentum_norm[kappa]:.3g} |")
display(Markdown("\n".join(table) + f"\n\nT = {T} gradients of q_proj {tuple(shape)}; Σ Gₜ itself has rank {numerical_rank(true_sum)}."))
_ = run.check("rank_at_most_r_per_projection", all(k <= R * n for k, n in kappa_ranks.values())
              and R >= kappa_ranks[10 * T][0])

# %% [markdown]
# The rank does not simply grow. The move to a new basis, M ← M A_old A_newᵀ (the paper's Algorithm
# 2, as the reference computes it), multiplies M by an r x r matrix whose entries are sums of m
# products of independent N(0, 1/r) draws: its expectation is 0 and its norm about √m, so each move
# scrambles the momentum and scales it by about √(m/r) (8.5 for q_proj at r = 8). With κ = 1 or 2
# the momentum is moved at (nearly) every step and ‖M_T‖ grows by orders of magnitude; the sum is
# then dominated by the last few momenta, and its numerical rank is small. At the reference's
# default κ = 1000 a move is rare; the chapter's κ = 2 is the harsh end of this range.

# %%
print(f"‖M_T‖ with a move at every step (κ = 1): {momentum_norm[1]:.3g}; with one projection (κ = {10 * T}): "
      f"{momentum_norm[10 * T]:.3g}")
_ = run.check("frequent_moves_inflate_the_momentum", momentum_norm[1] > 10 * momentum_norm[10 * T])

# %% [markdown]
# ## 4. The buffers of compressed accumulation, and the embedding
#
# `FloraAccumulationStep.setup` installs the hooks and knows what the buffers will hold; no step is
# needed to count them. Plain accumulation keeps a gradient as large as each parameter; the
# compressed one keeps r max(n, m) floats per matrix: the accelerator compresses every matrix, the
# embedding included, where the optimizer's momentum rule (aspect ratio at most 4) leaves the
# embedding full.

# %%
full_model = task.base()
MB = 2**20
embedding = full_model.get_input_embeddings().weight
lines, ratios_acc = [], []
for r in (8, 64):
    step = FloraAccumulationStep(rank=r)
    step.setup(full_model, TrainConfig(grad_accum=2, max_grad_norm=None))
    compressed, dense = step.buffer_bytes(), step.buffer_bytes(dense=True)
    ratios_acc.append(compressed / dense)
    emb = r * max(embedding.shape) * 4
    lines.append(f"r = {r}: {compressed / MB:.1f} MB compressed vs {dense / MB:.0f} MB dense ({compressed / dense:.2%}); "
                 f"the embedding's share: {emb / compressed:.0%} of the compressed, {embedding.numel() * 4 / dense:.0%} of the dense")
    step.remove()
print("\n".join(lines))
emb_full, emb_if_compressed = embedding.numel() * 4, 64 * max(embedding.shape) * 4
print(f"the optimizer's momentum of the embedding: {emb_full / MB:.0f} MB full; {emb_if_compressed / MB:.0f} MB if it were "
      "compressed at r = 64 like the projections")
_ = run.check("compressed_buffers_under_a_third_of_dense", all(x < 1 / 3 for x in ratios_acc))

# %% [markdown]
# Dense, the embedding is a fifth of everything accumulated; compressed, each of the 49,152 rows
# keeps r numbers, so it is still the largest single buffer, but no longer most of the total. In
# the optimizer the reference rules embeddings out of compression (its code says only "rule out
# embeddings", by the aspect ratio); the accumulation buffer lives for one step and is drawn anew
# at every step, the momentum lives across κ steps. On SmolLM2 that one rule is most of FLORA's
# state: compressing the embedding's momentum too would shrink it from 108 MB to about 12 MB at r = 64.

# %%
_ = run.save(metrics={
    "decompression_ratio_to_theory": ratios,
    "lora_moved": moved,
    "kappa_ranks": {str(k): {"rank": v[0], "projections": v[1]} for k, v in kappa_ranks.items()},
    "accumulation": lines, "accumulation_compressed_over_dense": ratios_acc,
})
