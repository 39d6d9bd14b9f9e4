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
# # 09 · RoSA: a low-rank plus a sparse update
#
# LoRA assumes the fine-tuning update $\Delta W$ of a layer is low-rank. Nikdan et al. (2024) observe
# that the update full fine-tuning actually makes is better described, as in robust PCA, by a
# low-rank part **plus** a few large entries scattered anywhere. RoSA (Robust Adaptation) trains both:
#
# $$y = W_0 x + \tfrac{\alpha}{r} B A x + S x, \qquad S \text{ sparse with } k = \lfloor d \cdot d_{out} d_{in} \rfloor \text{ nonzeros.}$$
#
# Which entries $S$ may use is decided once, from gradients: train the low-rank part alone for a
# short warm-up, accumulate the squared gradient of every full weight (an empirical diagonal
# Fisher), keep the top $d$ fraction per layer, then restart from $W_0$ with both parts. $S$ lives
# in CSR, so the forward is a sparse-dense product (SpMM) and the gradient of its values a sampled
# dense-dense product (SDDMM): the dense $d_{out} \times d_{in}$ gradient is never formed.
#
# This notebook shows why low-rank plus sparse, builds the layer, proves the library against peft
# (RoSA is LoRA when $d = 0$ and peft's ShiRA when $r = 0$), and fine-tunes SmolLM2 on GSM8K (the
# paper's task) with LoRA, sparse-only and RoSA at exactly the same number of trainable parameters.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
from peft_from_scratch import bib, core, data, equivalence, evaluate, figures, models, tasks, verdicts   # first: quiets tqdm

import copy
import dataclasses

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from peft_from_scratch.blocks.masks import top_k_mask
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.notebook import start
from peft_from_scratch.reparameterized import rosa
from peft_from_scratch.reparameterized.rosa import RoSAConfig, RoSALinear
from peft_from_scratch.training import TrainConfig, train

run = start("09_rosa", profile, seed, results_dir)
bib.paper_card("nikdan2024rosa",
               claim="At the same parameter budget, a low-rank plus a sparse update (the mask chosen from accumulated "
                     "squared gradients) adapts a frozen LLM better than LoRA or a sparse update alone (LLaMA-2-7B on "
                     "GSM8K: RoSA r=12, d=0.15% 31.2% solved, LoRA r=16 28.4%, sparse-only 26.2%). Tested here on "
                     "SmolLM2 with held-out loss, and with the solve rate where this scale can measure it.")

# %% [markdown]
# ## Where RoSA sits
#
# Every linear layer of every decoder layer is adapted (drawn: `down_proj`, 1536 → 576). Beside the
# frozen $W_0$ run two trained branches, added to its output: LoRA's $\frac{\alpha}{r} B A x$ and the
# sparse $S x$, where $S$ has $W_0$'s shape but only $k$ stored entries (CSR: $k$ values, their $k$
# columns, and 577 row offsets). The budget of LoRA r = 16 is split as r = 12 plus
# $4 (d_{in} + d_{out})$ sparse entries.

# %%
fig, ax = figures.canvas(12, 8, "RoSA (r = 12 + sparse S) on a linear layer of SmolLM2 (here down_proj)")
at = figures.llama_block(ax, x=6)
figures.side_branch(ax, at["down_proj"], "A  (12 x 1536)", "B  (576 x 12)", label="+ (α/r) B A x", dx=0.5)
figures.side_branch(ax, at["down_proj"], f"S  (576 x 1536), k = {4 * (1536 + 576):,d}", side="left", dx=0.5,
                    label="+ S x (SpMM)", w=2.2)
figures.legend(ax, 9.6, 0.3)
plt.show()

# %% [markdown]
# ## 1. Why low-rank plus sparse
#
# A matrix that is neither low-rank nor sparse: a rank-4 matrix plus 2% large spikes. We give
# three approximations the same budget of stored numbers (indices not counted): the best rank-8
# approximation (SVD, Eckart-Young), the best 8·2n-entry sparse one (keep the largest entries), and
# rank 4 plus 4·2n sparse entries, fitted by alternating the two projections (the simplest robust
# PCA). Only the last can be right.

# %%
torch.manual_seed(seed)
n = 64
low_rank = torch.randn(n, 4) @ torch.randn(4, n) / 2
spikes = torch.zeros(n * n)
spikes[torch.randperm(n * n)[: int(0.02 * n * n)]] = 8 * torch.randn(int(0.02 * n * n))
M = low_rank + spikes.view(n, n)


def best_rank(X, r):
    U, s, Vh = torch.linalg.svd(X)
    return U[:, :r] @ torch.diag(s[:r]) @ Vh[:r]


def best_sparse(X, k):
    return X * top_k_mask(X.abs(), k)


def low_rank_plus_sparse(X, r, k, iters=50):
    S = torch.zeros_like(X)
    for _ in range(iters):
        L = best_rank(X - S, r)
        S = best_sparse(X - L, k)
    return L + S


budget = 8 * 2 * n
errors = {"rank 8": best_rank(M, 8), f"{budget} entries": best_sparse(M, budget),
          f"rank 4 + {budget // 2} entries": low_rank_plus_sparse(M, 4, budget // 2)}
errors = {k: ((v - M).norm() / M.norm()).item() for k, v in errors.items()}
fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, (title, X) in zip(axes, [("M = L + S", M), ("L (rank 4)", low_rank), ("S (2% spikes)", spikes.view(n, n))]):
    ax.imshow(X, cmap="RdBu", vmin=-6, vmax=6); ax.set_title(title); ax.axis("off")
plt.tight_layout(); plt.show()

# %%
# NBVAL_CHECK_OUTPUT
for name, e in errors.items():
    print(f"{name:22s} relative error {e:.3f}")

# %% [markdown]
# ## 2. Build it
#
# The layer in the paper's notation, written densely so that every symbol is visible: $S$ is a
# $d_{out} \times d_{in}$ matrix of zeros with `values[i]` at (`rows[i]`, `cols[i]`). Autograd then
# gives the gradient of the values as the dense gradient $\partial L / \partial S = g^\top x$ read at
# the mask, where $g = \partial L / \partial y$. The SDDMM computes exactly that without ever forming
# $g^\top x$: for each stored entry, one dot product over the tokens,
# $\partial L / \partial\,\mathrm{values}[i] = \sum_n g[n, \mathrm{rows}[i]]\; x[n, \mathrm{cols}[i]]$.

# %%
def my_rosa(x, W0, A, B, scale, values, rows, cols):
    """y = W0 x + (alpha/r) B A x + S x for x (N, d_in), S zero but for S[rows[i], cols[i]] = values[i]."""
    S = torch.zeros(W0.shape, dtype=values.dtype).index_put((rows, cols), values)   # (d_out, d_in), dense
    return x @ W0.T + scale * (x @ A.T) @ B.T + x @ S.T                               # (N, d_out)


def my_sddmm(g, x, rows, cols):
    """dL/dvalues[i] = sum_n g[n, rows[i]] x[n, cols[i]]: (g^T x) at the mask only. g (N, d_out), x (N, d_in)."""
    return (g[:, rows] * x[:, cols]).sum(0)                                           # (k,)


# %% [markdown]
# The library's `RoSALinear` on one layer of SmolLM2's shape, with a random mask of $d = 1\%$ and
# "trained" values and $B$; ours gets the same tensors.

# %%
smol, tok = models.load_model(models.SMOLLM2)
smol.eval()
torch.manual_seed(seed)
layer = RoSALinear(copy.deepcopy(smol.model.layers[0].mlp.down_proj), r=4, alpha=8, d=0.01)
layer.set_mask(top_k_mask(torch.rand(layer.shape), layer.k))
with torch.no_grad():
    layer.values.normal_(std=0.02), layer.lora.B.normal_(std=0.02)
rows, cols = layer.mask().nonzero(as_tuple=True)              # row-major, the CSR order of layer.values
W0 = layer.base_layer.weight.detach()
A = layer.lora.A.detach().clone().requires_grad_()
B = layer.lora.B.detach().clone().requires_grad_()
values = layer.values.detach().clone().requires_grad_()
x = torch.randn(64, layer.shape[1])                           # 64 tokens
x_mine, x_lib = x.clone().requires_grad_(), x.clone().requires_grad_()
y_mine = my_rosa(x_mine, W0, A, B, layer.lora.scaling, values, rows, cols)
y_lib = layer(x_lib)
g = torch.randn_like(y_lib)                                   # an upstream gradient dL/dy
y_mine.backward(g), y_lib.backward(g)
close = lambda a, b: ((a - b).abs().max() / b.abs().max()).item() < 1e-5   # noqa: E731  float32, relative to the largest entry
built = {"output": close(y_mine, y_lib), "grad values": close(values.grad, layer.values.grad),
         "grad A": close(A.grad, layer.lora.A.grad), "grad B": close(B.grad, layer.lora.B.grad),
         "grad x": close(x_mine.grad, x_lib.grad),
         "SDDMM = dense gradient at the mask": close(my_sddmm(g, x, rows, cols), values.grad)}
print(f"down_proj {tuple(layer.shape)}: {W0.numel():,d} weights; d = 1% keeps k = {layer.k:,d}, stored as "
      f"{layer.k:,d} values + {layer.k:,d} columns + {layer.shape[0] + 1} row offsets")

# %%
# NBVAL_CHECK_OUTPUT
for what, ok in built.items():
    print(f"your RoSA and the library's RoSALinear agree on {what} (float32, 1e-5): "
          f"{run.check('my_rosa_equals_library_' + what.split(' =')[0].replace(' ', '_'), ok)}")

# %% [markdown]
# The library computes $Sx$ with PyTorch's sparse CSR kernels on a CPU and with Triton kernels on a
# GPU (`kernels/sparse.py`, each tested against the dense formula in `tests/test_rosa_kernels.py`).
#
# ## 3. Proof against peft
#
# peft has no RoSA, but it has both ends. With $d = 0$ RoSA is LoRA: compare with peft's LoRA. With
# $r = 0$ it is a sparse-only adapter: compare with peft's ShiRA, which keeps exactly
# $r(d_{in} + d_{out})$ entries per layer (LoRA rank $r$'s budget) and accepts a mask through its
# `mask_fn`; `rosa.lora_budget_density` gives the densities that match that count layer by layer,
# and `peft_io.shira_twin` hands our masks (chosen by our Fisher rule) and values to ShiRA. Both
# comparisons run on the real SmolLM2 cut to its first layers (the embeddings, the norms, the head
# and those layers are the real ones; 4 layers, 2 in the smoke profile), every linear layer adapted,
# on the first 64 tokens of two GSM8K training problems (every token predicted): logits at every
# step, gradients at the first, parameters after three AdamW steps, all within rtol 1e-5, atol 1e-6
# of the largest entry, in float32. (Rounding differences add up layer after layer; a few layers
# test every operation while staying inside that tolerance.)
#
# LoRA (d = 0) runs the same float operations in the same order as peft, so it agrees bit for bit.
# ShiRA adds S into the weight, $(W_0 + S)x$, where we compute $W_0 x + Sx$: the same function,
# rounded differently, so logits and gradients differ in their last bits. Adam then amplifies that
# difference for one kind of entry: its step $\hat m / \sqrt{\hat v}$ is about ±lr *whatever the size
# of the gradient*, so an entry whose gradient is so small that rounding decides its sign can step
# the other way. The parameters after three steps must therefore agree everywhere except, at most,
# at entries whose gradient rounding changed by more than 1% (ours and peft's gradients differ by
# more than 1% of it, at some step); we count both.

# %%
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
eq_layers = run.pick(smoke=2, cpu=4, gpu=4)
small = models.keep_layers(copy.deepcopy(smol), eq_layers).eval()
eq_rows = data.load_gsm8k("train", n=2, seed=seed)
eq_batches = [{"input_ids": b["input_ids"][:, :64], "attention_mask": b["attention_mask"][:, :64],
               "labels": b["input_ids"][:, :64]}             # the first 64 tokens of a problem, every token predicted
              for b in data.make_loader(data.tokenize_causal(eq_rows, tok, data.gsm8k_example, max_length=256), 1,
                                        pad_token_id=tok.pad_token_id)]

# d = 0 against peft's LoRA, B made non-zero ("trained")
ours, theirs, pairs = peft_io.twin(small, RoSAConfig(r=4, alpha=8, d=0, target_modules=TARGETS),
                                   perturb=peft_io.random_B(0.02, seed))
lora_report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=3, lr=1e-3, rtol=1e-5, atol=1e-6)
print(f"RoSA, d = 0, vs peft LoRA ({eq_layers} layers, {len(pairs)} adapter tensors):\n" + lora_report.table())

# r = 0 against peft's ShiRA: our Fisher masks and random "trained" values
R_SHIRA = 2
ours = core.add_adapter(copy.deepcopy(small), RoSAConfig(r=0, d=0, target_modules=TARGETS,
                                                         density_pattern=rosa.lora_budget_density(small, TARGETS, R_SHIRA)))
rosa.set_masks(ours, rosa.select_masks(rosa.accumulate_fisher(ours, eq_batches), ours.adapter_config))
g_values = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for sparse_layer in rosa.rosa_layers(ours).values():
        sparse_layer.values.copy_(torch.randn(sparse_layer.k, generator=g_values) * 0.01)
theirs, pairs = peft_io.shira_twin(ours, small)
grads = {name: ([], []) for name in pairs}                     # every step's gradient, ours and ShiRA's
for name, (mine, other) in pairs.items():
    mine.register_hook(lambda g, name=name: grads[name][0].append(g.detach().clone()))
    other.register_hook(lambda g, name=name: grads[name][1].append(g.detach().clone()))
shira_report = equivalence.compare(ours.eval(), theirs.eval(), pairs, eq_batches, steps=3, lr=1e-3, rtol=1e-5, atol=1e-6)
print(f"RoSA, r = 0, vs peft ShiRA (r = {R_SHIRA}, {eq_layers} layers):\n" + shira_report.table())

outside = rounding = unexplained = 0
for name, (mine, other) in pairs.items():                      # equivalence.Diff's tolerance, entry by entry
    ref = other.detach()
    off = (mine.detach() - ref).abs() > 1e-6 * max(ref.abs().max().item(), 1.0) + 1e-5 * ref.abs()
    at_rounding = torch.stack([(a - b).abs() > 0.01 * b.abs() for a, b in zip(*grads[name])]).any(0)
    outside, rounding = outside + int(off.sum()), rounding + int(at_rounding.sum())
    unexplained += int((off & ~at_rounding).sum())
shira_passed = (shira_report.diffs["logits"].outside == 0 and shira_report.diffs["grads"].outside == 0
                and unexplained == 0)
budget_shira = core.count_parameters(ours)[0], sum(p.numel() for p in theirs.parameters() if p.requires_grad)
del ours, theirs, pairs, grads, small

# %%
# NBVAL_CHECK_OUTPUT
print("d = 0 equals peft's LoRA:\n" + lora_report.verdict())
run.check("d0_matches_peft_lora_logits_grads_and_3_steps", lora_report.passed)
print("r = 0 equals peft's ShiRA: logits and gradients within tolerance, and every parameter outside it after 3 steps "
      "has a gradient at the rounding level:", run.check("r0_matches_peft_shira_logits_grads_and_3_steps", shira_passed))

# %%
print(f"ShiRA after 3 steps: {outside} of {shira_report.diffs['params'].total:,d} parameters outside the tolerance; "
      f"{rounding:,d} have a gradient at the rounding level (ours and ShiRA's differ by more than 1% at some step); "
      f"outside and not at the rounding level: {unexplained}")
print(f"trainable parameters: ours {budget_shira[0]:,d}, ShiRA {budget_shira[1]:,d}")

# %% [markdown]
# ## 4. SmolLM2 on GSM8K at one parameter budget
#
# Three adapters on every linear layer of SmolLM2, each with exactly the trainable parameters of
# LoRA r = 16, layer by layer (the paper's comparison: LoRA r = 16 against RoSA r = 12 with $d$ to
# match):
#
# * **LoRA** r = 16;
# * **SpA** (sparse only): r = 0, $16(d_{in} + d_{out})$ entries per layer;
# * **RoSA**: r = 12 plus $4(d_{in} + d_{out})$ entries per layer.
#
# The paper's recipe, shortened: α = 16, the LoRA learning rate above the sparse one (7e-4 and 2e-4 in
# the authors' scripts; ours 1e-3 and 3e-4), the mask from a LoRA-only warm-up (64 steps there) and
# the mean squared gradient over a few batches, then a restart from $W_0$. Every method trains on the
# same problems in the same order for the same steps. The cpu profile runs 8 steps of 3 problems:
# three such runs (and the warm-ups) are what fits in ten minutes on two cores. The gpu profile
# trains two epochs of 1,800 problems (225 steps of 16, close to the paper's epoch of 7,473 in
# steps of 32) and gives each method a learning-rate sweep (×0.3, ×1, ×3), picked by held-out loss on
# 200 problems of the training split that training does not use.
#
# Metrics: the held-out loss of each test problem's worked solution (mean per token, then over
# problems), and the solve rate: greedy solutions whose final number is right.

# %%
print("data:", bib.cite("cobbe2021training"), "| model:", bib.cite("allal2025smollm2"))
cfg = run.pick(
    smoke=dict(n_train=2, n_select=0, batch=1, steps=2, warmup_steps=1, fisher_batches=1, n_test=4, n_gen=2,
               new_tokens=16, max_length=192, layers=2, lr_scales=(1.0,)),
    cpu=dict(n_train=24, n_select=0, batch=3, steps=8, warmup_steps=3, fisher_batches=2, n_test=24, n_gen=8,
             new_tokens=64, max_length=256, layers=None, lr_scales=(1.0,)),
    gpu=dict(n_train=1800, n_select=200, batch=16, steps=225, warmup_steps=64, fisher_batches=8, n_test=500,
             n_gen=500, new_tokens=256, max_length=512, layers=None, lr_scales=(0.3, 1.0, 3.0)),
)
if cfg["layers"]:                                        # smoke: the code path on the first layers only
    models.keep_layers(smol, cfg["layers"])
smol.to(run.torch_device)
LR_LORA, LR_SPARSE, ALPHA = 1e-3, 3e-4, 16
tokenize = lambda rows: data.tokenize_causal(rows, tok, data.gsm8k_example, max_length=cfg["max_length"])  # noqa: E731
train_rows = data.load_gsm8k("train", n=cfg["n_train"] + cfg["n_select"], seed=seed)
train_ds = tokenize(train_rows.select(range(cfg["n_train"])))
select_ds = tokenize(train_rows.select(range(cfg["n_train"], cfg["n_train"] + cfg["n_select"]))) if cfg["n_select"] else None
test_rows = data.load_gsm8k("test", n=cfg["n_test"], seed=seed)
test_ds = tokenize(test_rows)
gen_rows = test_rows.select(range(cfg["n_gen"]))
loader = lambda ds, shuffle=False: data.make_loader(ds, cfg["batch"] if shuffle else 16, shuffle=shuffle, seed=seed,  # noqa: E731
                                                    pad_token_id=tok.pad_token_id)
fisher_batches = [{k: v.to(run.torch_device) for k, v in b.items()}      # the hooks run where the model is
                  for b in list(data.make_loader(train_ds, cfg["batch"], shuffle=True, seed=seed + 1,
                                                 pad_token_id=tok.pad_token_id))[: cfg["fisher_batches"]]]


def solved(model) -> tuple[list[int], list[str]]:
    """1/0 per problem of ``gen_rows``: does the greedy solution's final number equal the answer?"""
    answers = evaluate.generate(model, tok, [data.gsm8k_example(r)[0] for r in gen_rows], max_new_tokens=cfg["new_tokens"])
    return [int(evaluate.final_number(a) == r["final"]) for a, r in zip(answers, gen_rows)], answers


configs = {
    "LoRA r=16": RoSAConfig(r=16, alpha=ALPHA, d=0, target_modules=TARGETS, lr_lora=LR_LORA),
    "SpA": RoSAConfig(r=0, d=0, target_modules=TARGETS, lr_sparse=LR_SPARSE,
                      density_pattern=rosa.lora_budget_density(smol, TARGETS, 16)),
    "RoSA r=12": RoSAConfig(r=12, alpha=ALPHA, d=0, target_modules=TARGETS, lr_lora=LR_LORA, lr_sparse=LR_SPARSE,
                            density_pattern=rosa.lora_budget_density(smol, TARGETS, 4)),
}


def fit(name: str, config: RoSAConfig, scale: float = 1.0):
    """Train ``config`` on GSM8K (RoSA and SpA: warm-up, mask, restart, train); returns (model, history, masks)."""
    model = copy.deepcopy(smol)
    config = dataclasses.replace(config, lr_lora=config.lr_lora and config.lr_lora * scale,
                          lr_sparse=config.lr_sparse and config.lr_sparse * scale)
    train_fn = lambda m: train(m, loader(train_ds, shuffle=True), TrainConfig(lr=LR_LORA * scale, max_steps=cfg["steps"],  # noqa: E731
                                                                                seed=seed),
                               params=rosa.param_groups(m), desc=f"GSM8K {name}, lr x{scale:g}")
    if not config.density_pattern:                           # LoRA: d = 0, no mask to choose
        core.add_adapter(model, config)
        return model, train_fn(model), {}
    warmup = lambda m: train(m, loader(train_ds, shuffle=True), TrainConfig(lr=LR_LORA * scale,  # noqa: E731
                             max_steps=cfg["warmup_steps"], seed=seed), desc=f"{name} warm-up (LoRA only)")
    out = rosa.train_rosa(model, config, train_fn=train_fn, fisher_batches=fisher_batches, warmup_fn=warmup)
    return model, out.train, out.masks


zero_shot = {"loss": tasks.example_losses(smol, loader(test_ds))}
zero_shot["solved"], _ = solved(smol)
results, masks = {}, {}
for name, config in configs.items():
    if len(cfg["lr_scales"]) > 1:                            # the gpu profile: a sweep, picked on the selection split
        def score(scale):
            model, hist, chosen = fit(name, config, scale)
            return sum(tasks.example_losses(model, loader(select_ds))) / len(select_ds), (model, hist, chosen, scale)
        _, (model, hist, chosen, scale), _ = tasks.pick_lr(score, cfg["lr_scales"], higher_is_better=False)
    else:
        (model, hist, chosen), scale = fit(name, config), 1.0
    losses = tasks.example_losses(model, loader(test_ds))
    trainable = core.count_parameters(model)[0]
    core.merge_adapter(model)                                # generation at the base model's cost
    right, answers = solved(model)
    results[name] = dict(hist=hist, losses=losses, loss=sum(losses) / len(losses), solved=right,
                         solve_rate=sum(right) / len(right), answer=answers[0], trainable=trainable, lr_scale=scale)
    masks[name] = chosen
    del model
zero_shot_loss = sum(zero_shot["loss"]) / len(zero_shot["loss"])
print(f"zero-shot: held-out loss {zero_shot_loss:.3f}, solved {sum(zero_shot['solved'])}/{cfg['n_gen']}")
for name, r in results.items():
    print(f"{name:10s}: held-out loss {r['loss']:.3f}, solved {sum(r['solved'])}/{cfg['n_gen']}, "
          f"{r['trainable']:,d} trainable, {r['hist'].wall_time_s / len(r['hist'].step):.1f} s/step")
print(f"\nQ: {gen_rows[0]['question'][:200]}...\n" + "\n".join(f"  {k}: {r['answer'][-160:]!r}" for k, r in results.items()))

# %%
# NBVAL_CHECK_OUTPUT
budgets = {k: r["trainable"] for k, r in results.items()}
density = {k: sum(m.sum().item() for m in v.values()) / sum(m.numel() for m in v.values()) for k, v in masks.items() if v}
print("the three budgets are equal by construction (lora_budget_density):", len(set(budgets.values())) == 1)

# %%
print(", ".join(f"{k}: {v:,d} trainable" for k, v in budgets.items()))
print(", ".join(f"{k}: d = {100 * v:.2f}%" for k, v in density.items()) + " of all adapted weights")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for name, r in results.items():
    r["hist"].plot(axes[0], label=name)
axes[0].axhline(zero_shot_loss, ls=":", color="gray", label="zero-shot held-out loss")
axes[0].set_title("GSM8K training loss"); axes[0].legend(fontsize=8)
axes[1].bar(list(results), [r["loss"] for r in results.values()])
axes[1].axhline(zero_shot_loss, ls=":", color="gray")
axes[1].set(ylabel="held-out loss", ylim=(min(r["loss"] for r in results.values()) * 0.95, zero_shot_loss * 1.02),
            title=f"GSM8K held-out loss, {cfg['n_test']} test problems")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. What the mask chose
#
# The mask is the top $k$ of the accumulated squared gradients, per layer; `tests/test_rosa.py`
# checks it against a brute-force top-k of gradients computed with $W_0$ trainable. Below, RoSA's
# mask for one attention and one MLP projection in the middle of the network, and how the chosen
# entries spread over rows and columns: not uniformly, since gradients concentrate on some input
# features (columns) and output units (rows).

# %%
mid = len(smol.model.layers) // 2
shown = [f"model.layers.{mid}.self_attn.q_proj", f"model.layers.{mid}.mlp.down_proj"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for ax, name in zip(axes, shown):
    m = masks["RoSA r=12"][name].cpu()
    ax.imshow(m[:192, :192], cmap="Greys", interpolation="nearest")
    ax.set_title(f"{name.split('.', 2)[2]}: top-left 192x192\n{int(m.sum()):,d} of {m.numel():,d} entries")
m = masks["RoSA r=12"][shown[0]].cpu()
col_share = m.sum(0).sort(descending=True).values.cumsum(0) / m.sum()
row_share = m.sum(1).sort(descending=True).values.cumsum(0) / m.sum()
axes[2].plot(torch.linspace(0, 1, len(col_share)), col_share, label="columns (input features)")
axes[2].plot(torch.linspace(0, 1, len(row_share)), row_share, label="rows (output units)")
axes[2].plot([0, 1], [0, 1], ls=":", color="gray", label="uniform")
axes[2].set(xlabel="share of rows / columns, busiest first", ylabel="share of mask entries", title=shown[0].split(".", 2)[2])
axes[2].legend(fontsize=8); plt.tight_layout(); plt.show()
top10_cols = col_share[int(0.1 * len(col_share)) - 1].item()
print(f"the busiest 10% of q_proj's input columns hold {100 * top10_cols:.0f}% of its mask entries")

# %% [markdown]
# ## Paper vs. ours
#
# The held-out loss differences get a paired bootstrap over the test problems (the same problems for
# every method). The solve rate is the paper's metric; whether this run can measure it at all is
# decided from its own numbers: one problem must weigh less than the paper's 2.8-point gap
# (31.2% − 28.4%), and at least one of the two adapters must solve something.

# %%
PAPER_GAP = 31.2 - 28.4          # points, RoSA minus LoRA on GSM8K (references/claims.toml)
lora, spa, rosa_r = (results[k] for k in ("LoRA r=16", "SpA", "RoSA r=12"))
loss_words = lambda r: f"{r['loss']:.3f}"  # noqa: E731
rosa_vs_lora = verdicts.mean_difference(lora["losses"], rosa_r["losses"], what="test problems")
spa_vs_lora = verdicts.mean_difference(spa["losses"], lora["losses"], what="test problems")
v_rosa = run.verdict("rosa_beats_lora_at_equal_budget", rosa_vs_lora, at_least=0.0,
                     ours=f"SmolLM2, {cfg['steps']} steps x {cfg['batch']}, {budgets['LoRA r=16']:,d} trainable each: "
                          f"held-out loss LoRA {loss_words(lora)}, RoSA {loss_words(rosa_r)} (zero-shot {zero_shot_loss:.3f})")
v_spa = run.verdict("rosa_lora_beats_sparse_only", spa_vs_lora, at_least=0.0,
                    ours=f"held-out loss SpA {loss_words(spa)}, LoRA {loss_words(lora)}")
per_problem = 100 / cfg["n_gen"]
counts = f"LoRA {sum(lora['solved'])}/{cfg['n_gen']}, RoSA {sum(rosa_r['solved'])}/{cfg['n_gen']}, " \
         f"SpA {sum(spa['solved'])}/{cfg['n_gen']}, zero-shot {sum(zero_shot['solved'])}/{cfg['n_gen']}"
too_coarse = per_problem > PAPER_GAP                     # one problem outweighs the effect to be measured
nothing_solved = sum(lora["solved"]) + sum(rosa_r["solved"]) == 0
if too_coarse or nothing_solved:
    why = ([f"one problem is {per_problem:.1f} points, more than the paper's {PAPER_GAP:.1f}-point gap"] * too_coarse
           + ["neither adapter solves a problem, so there is no rate to compare"] * nothing_solved)
    run.verdict("rosa_gsm8k_solve_rate", None, ours=counts,
                not_testable=f"{counts} solved (greedy, {cfg['new_tokens']} new tokens): " + "; ".join(why))
else:
    run.verdict("rosa_gsm8k_solve_rate", verdicts.mean_difference(rosa_r["solved"], lora["solved"], what="test problems"),
                at_least=0.0, ours=counts)
display(run.verdict_table())

# %% [markdown]
# **One step further, where a held-out-loss claim is not reproduced.** Every method here trains at
# the learning rates taken from the authors' scripts, for a few dozen steps; in so short a run the
# ordering of two adapters can be nothing but their learning rates. So where a claim fails we
# retrain LoRA, the method both claims set against the others, at 3× its learning rate (the top of
# the adapter sweep of the other notebooks), and see whether the ordering turns.

# %%
further = {}
if "not reproduced" in (v_rosa, v_spa) and len(cfg["lr_scales"]) == 1:
    model, hist, _ = fit("LoRA r=16", configs["LoRA r=16"], 3.0)
    further = {"losses": tasks.example_losses(model, loader(test_ds)), "hist": hist}
    further["loss"] = sum(further["losses"]) / len(further["losses"])
    del model
    print(f"LoRA r=16 at lr {3 * LR_LORA:g}: held-out loss {further['loss']:.3f} (at {LR_LORA:g}: {lora['loss']:.3f})")
    print("held-out loss differences against that LoRA (positive: the claim's direction): "
          f"loss(LoRA x3) - loss(RoSA) = {verdicts.mean_difference(further['losses'], rosa_r['losses'], what='test problems')}, "
          f"loss(SpA) - loss(LoRA x3) = {verdicts.mean_difference(spa['losses'], further['losses'], what='test problems')}")
else:
    print("both held-out-loss claims hold at least in direction: nothing to chase")

# %% [markdown]
# The paper's numbers are from its results figure (LLaMA-2-7B, bf16, one epoch on GSM8K's 7.5k
# problems, batch 32). SmolLM2-135M solves almost no GSM8K problems whatever the adapter (its 135M
# parameters are far below the scale at which grade-school arithmetic appears), and the cpu run is a
# few dozen steps, so held-out loss is the comparison that can move here; the paper's gaps are 1-3
# points on a 7B model after a full epoch.
#
# ## Exercises
#
# Answers: `solutions/09_rosa_solutions.ipynb`.
#
# 1. QRoSA: quantize SmolLM2 with `quantized.quantize_model` first, then run RoSA on the 4-bit base
#    (`RoSALinear` accepts `Linear4bit`; the Fisher hooks need no float weights). How far is its
#    held-out loss from RoSA on the float base?
# 2. Replace the Fisher mask by a random mask of the same size (`blocks.masks.top_k_mask(torch.rand(shape), k)`).
#    How much of RoSA's result is the choice of entries?
# 3. Skip the warm-up (`warmup_fn=None`): the mask then comes from gradients at $W_0$. How much does
#    it overlap the warm-up's mask, and does it matter in a short run?
# 4. Split one budget between rank and sparsity: r = 16, 12, 8, 4 with the rest sparse. Check that
#    every split trains exactly LoRA r = 16's parameter count, then compare them.
# 5. Time a step of RoSA against LoRA at the same budget (`python -m bench.bench_rosa` does it
#    carefully); on a GPU, the Triton SpMM/SDDMM run.

# %%
_ = run.save(metrics={
    "gsm8k": {name: {"test_loss": r["loss"], "solved": sum(r["solved"]), "solve_rate": r["solve_rate"],
                     "trainable_params": r["trainable"], "lr_scale": r["lr_scale"], "steps": len(r["hist"].step),
                     "s_per_step": r["hist"].wall_time_s / len(r["hist"].step)} for name, r in results.items()}
             | {"zero_shot": {"test_loss": zero_shot_loss, "solved": sum(zero_shot["solved"])},
                "n_test": cfg["n_test"], "n_gen": cfg["n_gen"]}
             | ({"lora_lr_x3_test_loss": further["loss"]} if further else {}),
    "toy_relative_error": errors, "built": built, "mask_top10pct_columns_share": top10_cols, "density": density,
    "equivalence": {"layers": eq_layers,
                    "lora": {k: {"max_abs": d.abs, "max_rel": d.rel} for k, d in lora_report.diffs.items()},
                    "shira": {k: {"max_abs": d.abs, "max_rel": d.rel, "outside": d.outside} for k, d in shira_report.diffs.items()}
                    | {"params_at_rounding_level": rounding, "params_outside_unexplained": unexplained}},
})
