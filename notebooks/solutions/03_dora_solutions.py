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
# # 03 · DoRA: solutions to the exercises
#
# The answers run on MiniLM and SST-2 as the chapter does (`tasks.SST2`, the chapter's smaller cpu
# task), at learning rates from the chapter's grids (this notebook does not read the chapter's
# results, so it does not know which one the chapter picked).

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import torch
import torch.nn.functional as F

from peft_from_scratch import core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.reparameterized.dora import DoRAConfig
from peft_from_scratch.reparameterized.lora import LoRAConfig, LoRALinear

run = start("03_dora_solutions", profile, seed, results_dir)
task = tasks.SST2.for_run(run, **run.pick(smoke={}, cpu=dict(n_train=1024, batch=16, steps=64), gpu={}))
adapter_lr = tasks.lrs(task, "adapter")[len(tasks.lrs(task, "adapter")) // 2]   # the middle of the grid
full_lr = tasks.lrs(task, "full")[0]

# %% [markdown]
# ## 1. The norm without `.detach()`
#
# The chapter's `my_dora`, with and without the detach, on MiniLM's layer-3 query weight (384 x 384)
# with a "trained" B and m. Autograd's saved tensors are counted with
# `torch.autograd.graph.saved_tensors_hooks`: every tensor a backward needs passes through the pack
# hook once.

# %%
def my_dora(x, W0, A, B, m, s, detach=True):
    V = W0 + s * B @ A                                   # (d_out, d_in)
    norm = torch.linalg.norm(V, dim=1)                   # (d_out,)
    if detach:
        norm = norm.detach()                             # the paper's Section 4.3: a constant in backward
    return F.linear(x, m[:, None] * V / norm[:, None])


def saved_bytes(fn):
    """Bytes autograd keeps for backward while ``fn()`` builds its graph (distinct storages, so a tensor saved twice counts once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


base = task.base()
q = base.bert.encoder.layer[3].attention.self.query
layer = LoRALinear(q, r=8, alpha=16)
g = torch.Generator().manual_seed(seed)
W0 = q.weight.detach()
A0 = layer.lora.A.detach().clone()
B0 = 0.05 * torch.randn(384, 8, generator=g)
m0 = torch.linalg.norm(W0, dim=1) * (1 + 0.05 * torch.randn(384, generator=g))
x = torch.randn(16, 384, generator=g)
grads, memory = {}, {}
for detach in (True, False):
    A, B, m = (t.clone().requires_grad_() for t in (A0, B0, m0))
    out, memory[detach] = saved_bytes(lambda: my_dora(x, W0, A, B, m, layer.lora.scaling, detach))
    out.square().sum().backward()
    grads[detach] = {"A": A.grad, "B": B.grad, "m": m.grad}
for k in ("A", "B", "m"):
    rel = ((grads[False][k] - grads[True][k]).norm() / grads[True][k].norm()).item()
    cos = F.cosine_similarity(grads[False][k].reshape(-1), grads[True][k].reshape(-1), dim=0).item()
    print(f"grad {k}: relative change without detach {rel:.3f}, cosine with the detached gradient {cos:.4f}")
print(f"saved for backward: {memory[True] / 1024:.0f} KiB with detach, {memory[False] / 1024:.0f} KiB without")
# m does not enter the norm, so its gradient is the same either way; A and B get an extra term from
# the norm's own gradient (pulling the row norms of W0 + sBA back), and the graph keeps what
# torch.linalg.norm needs for its backward.
run.check("detach_leaves_the_gradient_of_m_unchanged", torch.allclose(grads[False]["m"], grads[True]["m"], rtol=1e-5, atol=1e-7))
run.check("detach_changes_the_gradients_of_A_and_B", not torch.allclose(grads[False]["B"], grads[True]["B"], rtol=1e-3))

# %% [markdown]
# ## 2. Magnitude alone
#
# DoRA with A and B frozen (B stays 0, so $W' = m \cdot W_0 / \lVert W_0\rVert_c$: only each output
# row's length can change), plus the head, against the head alone and against full DoRA, at the
# same learning rate and steps. The differences get paired bootstrap intervals over the validation
# sentences.

# %%
def dora_model(freeze_lora):
    model = core.add_adapter(task.base(), DoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    if freeze_lora:
        for lay in core.adapter_layers(model).values():
            lay.lora.A.requires_grad_(False)
            lay.lora.B.requires_grad_(False)
    return model


head_only = task.base()
for name_, p in head_only.named_parameters():
    p.requires_grad_(name_.startswith("classifier."))
runs = {"head only": head_only, "m + head": dora_model(True), "DoRA (A, B, m) + head": dora_model(False)}
correct = {}
for label, model in runs.items():
    task.fit(model, adapter_lr, desc=f"SST-2 {label}, lr {adapter_lr:g}")
    correct[label] = task.correct(model)
    print(f"{label:22s} {core.count_parameters(model)[0]:>9,d} trained: accuracy {sum(correct[label]) / len(correct[label]):.3f}")
for a, b in (("m + head", "head only"), ("DoRA (A, B, m) + head", "m + head")):
    d = verdicts.mean_difference(correct[a], correct[b], seed=seed, what="validation sentences")
    print(f"{a} − {b}: {100 * d.estimate:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}]")
frozen = runs["m + head"]
q3 = frozen.get_submodule("bert.encoder.layer.3.attention.self.query")
run.check("magnitude_only_keeps_B_zero_and_moves_m",
          bool(q3.lora.B.abs().max() == 0) and not torch.equal(q3.variant.m.detach(), torch.linalg.norm(q3.base_layer.weight, dim=1)))

# %% [markdown]
# ## 3. The decomposition on `value`, with more checkpoints
#
# The chapter's analysis, on each layer's value weight, with twice as many checkpoints; full
# fine-tuning at the smallest learning rate of its grid, the adapters at the middle of theirs.

# %%
n_checkpoints = run.pick(smoke=2, cpu=8, gpu=16)


def value_weights(model):
    out = []
    for block in model.bert.encoder.layer:
        v = block.attention.self.value
        if isinstance(v, LoRALinear):
            V = v.base_layer.weight + v.delta_weight()
            out.append(v.variant.m[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True) if v.variant is not None else V)
        else:
            out.append(v.weight)
    return [w.detach().double() for w in out]


def decomposition(W, W0):
    return (1 - F.cosine_similarity(W, W0, dim=1)).mean().item(), (W.norm(dim=1) - W0.norm(dim=1)).abs().mean().item()


def across_layers(pts, layers):
    values = [torch.corrcoef(torch.stack([pts[t, layers, 0], pts[t, layers, 1]]))[0, 1].item()
              for t in range(pts.shape[0]) if pts[t, layers, 0].std() > 0 and pts[t, layers, 1].std() > 0]
    return sum(values) / len(values) if values else 0.0


W0_value = value_weights(task.base())
setups = {"full fine-tuning": (None, full_lr),
          "LoRA": (LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]), adapter_lr),
          "DoRA": (DoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]), adapter_lr)}
corr = {}
for label, (cfg, lr) in setups.items():
    model = task.base() if cfg is None else core.add_adapter(task.base(), cfg)
    pts = []
    tasks.fit_with_checkpoints(task, model, lr, lambda m: pts.append([decomposition(W, W0) for W, W0 in zip(value_weights(m), W0_value)]) or {},
                               every=max(1, task.steps // n_checkpoints), desc=f"SST-2 {label}, lr {lr:g}")
    pts = torch.tensor(pts, dtype=torch.float64)
    corr[label] = verdicts.bootstrap(lambda idx, p=pts: across_layers(p, idx), pts.shape[1], seed=seed, what="value layers")
    per_t = [across_layers(pts[t:t + 1], list(range(pts.shape[1]))) for t in range(pts.shape[0])]
    print(f"{label:17s} value weights: corr across layers {corr[label].estimate:+.2f} [{corr[label].low:+.2f}, {corr[label].high:+.2f}]; "
          "per checkpoint " + " ".join(f"{v:+.2f}" for v in per_t))
    if cfg is not None:
        probe = torch.randn(4, 384, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            v0 = model.bert.encoder.layer[0].attention.self.value
            reads = torch.allclose(F.linear(probe, value_weights(model)[0].float(), v0.base_layer.bias), v0(probe), rtol=1e-4, atol=1e-5)
        run.check(f"value_weights_read_what_{label}_computes", reads)

# %%
_ = run.save(metrics={"saved_bytes": {"detach": memory[True], "no_detach": memory[False]},
                      "magnitude_only": {k: sum(c) / len(c) for k, c in correct.items()},
                      "value_correlation": {k: v.to_dict() for k, v in corr.items()}})
