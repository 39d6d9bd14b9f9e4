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
# # 11 · GaLore: solutions to the exercises
#
# Each answer uses the chapter's model (SmolLM2) and real E2E batches from the chapter's task.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import time

from peft_from_scratch import tasks   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.optim import GaLoreAdamW, make_galore
from peft_from_scratch.optim.galore import projected_side
from peft_from_scratch.training import BackpropStep, TrainConfig, train

import torch
from torch import nn

run = start("11_galore_solutions", profile, seed, results_dir)
task = tasks.E2E.for_run(run, **run.pick(smoke={}, cpu=dict(n_train=48, n_select=16, n_test=24, steps=6, batch=4), gpu={}))
smol = task.base()
batch = next(iter(task.loader(task.train_set, shuffle=True)))
linear = {n: m for n, m in smol.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def gradients(model, batch):
    """{name of a linear layer: the gradient of its weight} on one batch."""
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: m.weight.grad.detach().clone() for n, m in model.named_modules() if n in linear}


G0 = gradients(smol, batch)
print(f"{len(linear)} linear weights, gradients from a batch {tuple(batch['input_ids'].shape)} of E2E")

# %% [markdown]
# ## 1. Which side is projected, and what the other side costs
#
# `proj_type="std"` projects on the left (P = U[:, :r], moments r x n) when m < n and on the right
# (P = Vᵀ[:r], moments m x r, stored r x m) when m >= n: a square matrix goes right. Either way the
# moments are r x max(m, n) and P is r x min(m, n). Forcing the other side on `gate_proj`
# (1536 x 576) makes P 1536 x r and the moments r x 576. Both sides give the same rank-r
# approximation of G (U_r U_rᵀ G = G V_r V_rᵀ, the truncated SVD), so only memory differs: two
# moments against one projector, the other side holds r (max - min) fewer floats. We measure both
# with `state_bytes` after one step on the real gradient, with a compact P.

# %%
name = "model.layers.0.mlp.gate_proj"
W0, G = linear[name].weight.detach(), G0[name]


def state_after_one_step(proj_type, rank=8):
    W = nn.Parameter(W0.clone())
    opt = GaLoreAdamW([{"params": [W], "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": proj_type}],
                      lr=1e-3, compact_projector=True)   # P alone, not the SVD factor it is sliced from (chapter, section 4)
    W.grad = G.clone()
    opt.step()
    return opt.state_bytes()


sides = {side: state_after_one_step(side) for side in ("std", "left", "right")}
for side, b in sides.items():
    print(f"{side:5s}: moments {b['moments']:,d} B, projector {b['projectors']:,d} B, total {b['total']:,d} B "
          f"(AdamW: {b['adamw']:,d} B)")
print("a square 576 x 576 matrix (q_proj) under std is projected on the", projected_side((576, 576), "std"))
m, n = W0.shape
print(f"std projects gate_proj on the right, and the left side would hold r (m - n) = {8 * (m - n):,d} fewer floats:",
      run.check("std_is_right_and_left_is_smaller", sides["std"] == sides["right"]
                and sides["right"]["total"] - sides["left"]["total"] == 4 * 8 * (m - n)))

# %% [markdown]
# ## 2. How much of the gradient a rank-r projection keeps
#
# ‖PᵀG‖_F / ‖G‖_F with P the top r singular vectors of G itself (what GaLore uses at a refresh):
# the square root of the share of the squared singular values in the top r.

# %%
def kept(G, r):
    s = torch.linalg.svdvals(G.float())
    return (s[:r].square().sum() / s.square().sum()).sqrt().item()


shares = {n: {r: kept(G0[n], r) for r in (8, 64)} for n in list(linear)[:7]}
for n, k in shares.items():
    print(f"{n.removeprefix('model.'):28s} {tuple(G0[n].shape)}: r=8 keeps {k[8]:.2f} of ‖G‖, r=64 keeps {k[64]:.2f}")
print("a rank-64 projection keeps more than a rank-8 one for every matrix:",
      run.check("more_rank_keeps_more", all(k[64] >= k[8] for k in shares.values())))

# %% [markdown]
# ## 3. How far the subspace moves between refreshes
#
# The principal angles between the rank-8 subspace of the gradient at the start and that of the
# gradient after 2 GaLore steps (the next refresh with T = 2), on the same batch: cosines near 1 mean
# the old moments still live in (nearly) the same directions; near 0, they describe a subspace the
# new P no longer sees.

# %%
model = task.base()
train(model, [batch, batch], TrainConfig(lr=1e-3, max_steps=2, warmup_ratio=0.0, schedule="constant", device="cpu"),
      step=BackpropStep(make_galore(model, rank=8, update_proj_gap=2)), progress=False)
G2 = gradients(model, batch)


def subspace(G, r=8):
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return U[:, :r] if G.shape[0] < G.shape[1] else Vh[:r].T     # the side std projects


cosines = {n: torch.linalg.svdvals(subspace(G0[n]).T @ subspace(G2[n])) for n in list(linear)[:7]}
for n, c in cosines.items():
    print(f"{n.removeprefix('model.'):28s} cosines of the principal angles: largest {c[0]:.2f}, mean {c.mean():.2f}, "
          f"smallest {c[-1]:.2f}")
print("cosines of principal angles lie in [0, 1]:", run.check("cosines_in_range",
      all(bool(((c >= -1e-5) & (c <= 1 + 1e-5)).all()) for c in cosines.values())))

# %% [markdown]
# ## 4. What the SVDs cost
#
# One refresh takes an SVD of every linear weight's gradient; we time that against one plain AdamW
# step (backward included) on the same batch.

# %%
def timed(fn, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


svd_time = timed(lambda: [torch.linalg.svd(g.float(), full_matrices=False) for g in G0.values()])
adam_model = task.base()
adam = torch.optim.AdamW(adam_model.parameters(), lr=1e-5)


def adam_step():
    adam_model(**batch).loss.backward()
    adam.step()
    adam.zero_grad()


adam_time = timed(adam_step)
print(f"SVDs of {len(G0)} gradients: {svd_time:.2f} s; one AdamW step (forward, backward, update): {adam_time:.2f} s; "
      f"a refresh every T = 200 steps adds {svd_time / (200 * adam_time):.2%} to the training time")

# %%
_ = run.save(metrics={"state_bytes_gate_proj_r8": sides, "kept": {n: {str(r): v for r, v in k.items()} for n, k in shares.items()},
                      "subspace_cosine_mean": {n: c.mean().item() for n, c in cosines.items()},
                      "svd_s": svd_time, "adamw_step_s": adam_time})
