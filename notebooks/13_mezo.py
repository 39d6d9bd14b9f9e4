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
# # 13 · MeZO: fine-tuning with forward passes only
#
# Backpropagation stores what the forward pass computed, then a gradient per parameter, then the
# optimizer's state. Malladi et al. (2023) drop all three. Their MeZO estimates the gradient from two
# losses: draw a random direction $z \sim \mathcal{N}(0, I_d)$, evaluate the loss at $\theta + \epsilon z$
# and at $\theta - \epsilon z$, and step along $z$ by the slope between them (SPSA, the paper's
# Definition 1):
#
# $$\hat\nabla L(\theta; B) = \frac{L(\theta + \epsilon z; B) - L(\theta - \epsilon z; B)}{2\epsilon}\, z
#   \;\approx\; z z^\top \nabla L(\theta; B), \qquad \theta \leftarrow \theta - \eta\, \hat\nabla L .$$
#
# Because $\mathbb{E}[z z^\top] = I$, the step follows the gradient on average. The memory trick
# (Algorithm 1): $z$ is never stored. A seed $s$ regenerates it whenever it is needed, one parameter
# tensor at a time, so the step needs the memory of inference.
#
# You write the step in a few lines and check it against the library's `MeZOStep`. You see the seed
# trick and the rounding the in-place perturbations leave. On a tiny network you watch the average of
# many estimates approach the backprop gradient. Then the library is proved equal to the official
# algorithm (princeton-nlp/MeZO), name rule for weight decay included. You run MeZO on LoRA and on
# prefix tuning and measure its memory against inference and against AdamW. Finally you train SmolLM2
# on SST-2 in the shape of the paper's Table 1: zero-shot, in-context learning, MeZO and backprop
# fine-tuning.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
import inspect
import math
import random

from peft_from_scratch import bib, core, data, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import PrefixTuningConfig
from peft_from_scratch.core.step import Step, StepResult
from peft_from_scratch.notebook import start
from peft_from_scratch.optim import OFFICIAL_NO_DECAY, MeZOStep, official_mezo
from peft_from_scratch.reparameterized import LoRAConfig
from peft_from_scratch.training import BackpropStep, TrainConfig, train
from peft_from_scratch.training.memory import CATEGORIES, measure_step

import matplotlib.pyplot as plt
import torch
from IPython.display import Code, Markdown, display
from torch import nn

run = start("13_mezo", profile, seed, results_dir)
bib.paper_card("malladi2023finetuning",
               claim="Zeroth-order SGD from two forward passes, with the perturbation regenerated from a seed, "
                     "fine-tunes a language model with the memory of inference. It beats zero-shot and comes "
                     "within about one point of backprop fine-tuning given many more steps (OPT-13B, SST-2).")

# %% [markdown]
# ## 1. Build it: one MeZO step
#
# Three helpers carry the whole algorithm. `z_from(seed, params)` resets a generator to the seed and
# draws $z_i$ for one tensor after another. `perturb` adds scale $\cdot z$ in place. The step
# perturbs by $+\epsilon$, then $-2\epsilon$, then $+\epsilon$ (back to $\theta$), and computes
# `projected_grad` $= (\ell_+ - \ell_-)/(2\epsilon)$, an estimate of the directional derivative
# $z^\top \nabla L$. Then it draws the same $z$ a fourth time and updates. At no moment does more
# than one tensor's $z$ exist.

# %%
def z_from(seed, params):
    """z_i ~ N(0, 1) of each tensor's shape, from a generator reset to seed: the same z every time."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        yield torch.normal(0.0, 1.0, p.shape, generator=gen, dtype=p.dtype)


@torch.no_grad()
def perturb(params, seed, scale):
    """θ ← θ + scale · z(seed), in place, one tensor's z at a time."""
    for p, z in zip(params, z_from(seed, params)):
        p.add_(z * scale)


@torch.no_grad()
def my_mezo_step(params, loss_fn, lr, eps, seed):
    """One step of MeZO (the paper's Algorithm 1). Returns projected_grad."""
    perturb(params, seed, eps)
    loss_plus = loss_fn()                                     # ℓ₊ = L(θ + εz)
    perturb(params, seed, -2 * eps)
    loss_minus = loss_fn()                                    # ℓ₋ = L(θ − εz)
    perturb(params, seed, eps)                                # back to θ, up to rounding
    projected_grad = ((loss_plus - loss_minus) / (2 * eps)).item()
    for p, z in zip(params, z_from(seed, params)):            # the same z, drawn a fourth time
        p.sub_(z * projected_grad * lr)                       # θ ← θ − η · projected_grad · z
    return projected_grad


# %% [markdown]
# The same step, on SmolLM2 answering SST-2 reviews with a label word (`tasks.LabelWords`, the task
# of notebook 08). Every parameter trains. The seeds are drawn as the library draws them: from a
# generator seeded with the training seed. The library's `MeZOStep` runs inside the shared training
# loop (`training.train`) for the same steps on the same sentences. The weights after `EQ_STEPS`
# steps must be equal bit for bit.

# %%
print("data:", bib.cite("socher2013recursive"), bib.cite("wang2018glue"), "| model:", bib.cite("allal2025smollm2"))
sst = tasks.LabelWords.for_run(run)
smol = sst.base()
tok = sst.tokenizer
EQ_STEPS, LR_EQ, EPS = 2, 1e-5, 1e-3
eq_batches = list(data.make_loader(sst.train_set.select(range(EQ_STEPS)), 1, pad_token_id=tok.pad_token_id))
constant = dict(warmup_ratio=0.0, schedule="constant", seed=seed, device="cpu")   # CPU: the CPU generator's z


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def loss_of(model, batch):
    """The step's loss function: eval mode (no dropout), float32, as the library's forward passes."""
    model.eval()
    return lambda: model(**batch).loss.float()


mine = sst.base()
seed_source = torch.Generator().manual_seed(seed)             # the library's seeds: from the training seed
my_seeds, my_grads = [], []
for batch in eq_batches:
    s = int(torch.randint(0, 10**9, (1,), generator=seed_source))
    my_seeds.append(s)
    my_grads.append(my_mezo_step(trainable(mine), loss_of(mine, batch), LR_EQ, EPS, s))

library = sst.base()
lib_step = MeZOStep(eps=EPS)
train(library, eq_batches, TrainConfig(lr=LR_EQ, max_steps=EQ_STEPS, **constant), step=lib_step, progress=False)
same_weights = all(torch.equal(p, q) for p, q in zip(mine.parameters(), library.parameters()))
moved = max((p - q).abs().max().item() for p, q in zip(library.parameters(), smol.parameters()))
n_params = sum(p.numel() for p in smol.parameters())
print(f"{n_params:,d} parameters perturbed and updated; seeds {my_seeds}; projected_grad "
      + ", ".join(f"{g:.4g}" for g in my_grads))
print(f"largest change of a weight after {EQ_STEPS} steps: {moved:.2e}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"your step gives the library's MeZOStep weights after {EQ_STEPS} steps, bit for bit:",
      run.check("my_mezo_equals_library", same_weights and moved > 0))
print("the same seeds and projected gradients:",
      run.check("same_seeds_and_projected_grads", my_seeds == lib_step.seeds and my_grads == lib_step.projected_grads))

# %% [markdown]
# ### The seed trick, and what the restore leaves behind
#
# Three facts, measured. (a) A seed gives the same $z$ each time it is drawn again, and the same
# numbers as the official code's `torch.manual_seed(s)` followed by one `torch.normal` per
# parameter. (b) A whole run is the starting weights plus one (seed, projected_grad) pair per step.
# Replaying the pairs, with no forward pass at all, rebuilds the trained model up to the restore's
# rounding (next point). (c) $\theta + \epsilon z - 2\epsilon z + \epsilon z$ is not exactly $\theta$
# in float32: each addition rounds. An exact restore would need a copy of $\theta$, which is the
# memory MeZO saves. We run one estimate with $\eta = 0$ and measure how far $\theta$ comes back.

# %%
s = lib_step.seeds[0]
theta = trainable(smol)
torch.manual_seed(s)                                          # the official code's way of drawing z
again, official_z = True, True
for p, z, z_again in zip(theta, z_from(s, theta), z_from(s, theta)):
    again &= torch.equal(z, z_again)
    official_z &= torch.equal(z, torch.normal(mean=0, std=1, size=p.shape))
other_seed = not torch.equal(next(z_from(s, theta)), next(z_from(s + 1, theta)))
torch.manual_seed(seed)                                       # leave the global generator as start() set it

replayed = sst.base()
with torch.no_grad():
    for s_t, g_t in zip(lib_step.seeds, lib_step.projected_grads):
        for p, z in zip(trainable(replayed), z_from(s_t, trainable(replayed))):
            p.sub_(z * g_t * LR_EQ)
replay_gap = max((p - q).abs().max().item() for p, q in zip(replayed.parameters(), library.parameters()))
print(f"replayed from {len(lib_step.seeds)} (seed, projected_grad) pairs: largest difference from the trained "
      f"weights {replay_gap:.1e} (the steps moved a weight by up to {moved:.1e})")
del mine, replayed

drift_model, u = sst.base(), 2.0 ** -24                       # u: float32's unit roundoff
theta0 = [p.detach().clone() for p in drift_model.parameters()]
with torch.no_grad():
    logits0 = drift_model.eval()(**eq_batches[0]).logits
    my_mezo_step(trainable(drift_model), loss_of(drift_model, eq_batches[0]), 0.0, EPS, s)   # η = 0: estimate only
    logits = drift_model(**eq_batches[0]).logits
    exact = sum(int((p == t).sum()) for p, t in zip(drift_model.parameters(), theta0)) / n_params
    drift = max((p - t).abs().max().item() for p, t in zip(drift_model.parameters(), theta0))
    units = max(((p - t).abs() / (u * (t.abs() + 2 * EPS * z.abs()))).max().item()
                for p, t, z in zip(drift_model.parameters(), theta0, z_from(s, theta0)))
    logit_drift = (logits - logits0).abs().max().item()
print(f"after +εz, −2εz, +εz (ε = {EPS:g}): {exact:.1%} of the weights come back bit for bit; the largest error "
      f"is {drift:.1e}, {units:.2f} u(|θ| + 2ε|z|) (the bound of three roundings: 3); logits move by {logit_drift:.1e}")
print(f"(not restoring at all would leave an error of ε|z|, about {EPS * math.sqrt(2 / math.pi):.0e} per weight)")
del drift_model, theta0

# %%
# NBVAL_CHECK_OUTPUT
print("a seed regenerates the same z, the official torch.manual_seed way too, and another seed does not:",
      run.check("seed_regenerates_z", again and official_z and other_seed))
print("the (seed, projected_grad) pairs rebuild the run up to the restore's rounding (1e-6):",
      run.check("seeds_replay_the_run", replay_gap < 1e-6))
print("θ comes back within three roundings after the two perturbations:", run.check("restore_within_rounding", units <= 3.0))

# %% [markdown]
# ### The estimate is the gradient on average
#
# One estimate is a single direction: $g\,z$ with $g \approx z^\top \nabla L$. Its expectation is
# $\mathbb{E}[z z^\top] \nabla L = \nabla L$, and its error is large: for Gaussian $z$,
# $\mathbb{E}\|g z - \nabla L\|^2 = (d + 1)\|\nabla L\|^2$, so the mean of $N$ estimates has a
# relative error of about $\sqrt{(d+1)/N}$. On a 2-layer network with $d = 49$ parameters, in float64,
# we average `my_mezo_step`'s estimates ($\eta = 0$) and compare them with the gradient backprop gives.

# %%
torch.manual_seed(seed)
mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
y = torch.sin(x.sum(1, keepdim=True))
mlp_loss = lambda: ((mlp(x) - y) ** 2).mean()                 # noqa: E731
mlp_loss().backward()
grad = torch.cat([p.grad.flatten() for p in mlp.parameters()])
mlp.zero_grad(set_to_none=True)
d = grad.numel()

N_MAX = 4000
total, curve = torch.zeros_like(grad), {}
for i in range(1, N_MAX + 1):
    g = my_mezo_step(list(mlp.parameters()), mlp_loss, 0.0, 1e-4, seed=i)
    total += g * torch.cat([z.flatten() for z in z_from(i, list(mlp.parameters()))])
    if i in (1, 3, 10, 30, 100, 300, 1000, 3000, N_MAX):
        mean = total / i
        curve[i] = (((mean - grad).norm() / grad.norm()).item(), nn.functional.cosine_similarity(mean, grad, dim=0).item())
for n, (err, cos) in curve.items():
    print(f"N = {n:5d}: relative error {err:6.3f} (sqrt((d+1)/N) = {math.sqrt((d + 1) / n):6.3f}), cosine {cos:.3f}")

fig, ax = plt.subplots(figsize=(5.5, 3.2))
ns = list(curve)
ax.loglog(ns, [curve[n][0] for n in ns], "o-", label="mean of N estimates")
ax.loglog(ns, [math.sqrt((d + 1) / n) for n in ns], "k--", label=r"$\sqrt{(d+1)/N}$")
ax.set(xlabel="N (directions z averaged)", ylabel=r"$\|\bar g - \nabla L\| / \|\nabla L\|$",
       title=f"MeZO's estimate vs backprop, a d = {d} network")
ax.legend(); plt.tight_layout(); plt.show()

# %%
# NBVAL_CHECK_OUTPUT
err_1, err_n = curve[1][0], curve[N_MAX][0]
print(f"the mean of {N_MAX} estimates points along the gradient (cosine > 0.95) and its error falls like "
      "sqrt(d/N) (within 2x):",
      run.check("estimate_is_unbiased", curve[N_MAX][1] > 0.95 and err_n < 2 * math.sqrt((d + 1) / N_MAX) and err_n < err_1 / 10))

# %% [markdown]
# For SmolLM2, $d$ = 135 million: one estimate's relative error is about 11,600. That is why MeZO
# takes many more steps than backprop. The paper's analysis (its Section 4) argues that the slowdown
# depends on the effective rank of the loss's Hessian, not on $d$, which is why fine-tuning works at all.

# %% [markdown]
# ## 2. The library against the official algorithm
#
# There is no maintained MeZO package: the reference is the official repository's algorithm
# (princeton-nlp/MeZO, `large_models/trainer.py`: `zo_perturb_parameters`, `zo_step`, `zo_update`),
# written out the way it computes in `optim.mezo.official_mezo` (below; the tests and the benchmark
# use the same function). It reseeds torch's global generator, updates `.data` out of
# place, and adds weight decay $\lambda\theta$ to every parameter whose name contains none of
# "bias", "layer_norm", "layernorm". It replays the seeds the library drew. Same weights in, same
# weights out after `EQ_STEPS` steps, bit for bit.

# %%
display(Code(inspect.getsource(official_mezo), language="python"))      # the library's one copy of it

# %%
reference = sst.base()
official_mezo(reference, lib_step.seeds, [[b] for b in eq_batches], LR_EQ, EPS)   # one batch per step
lib_vs_official = max((p - q).abs().max().item() for p, q in zip(library.parameters(), reference.parameters()))
print(f"max |library − official| after {EQ_STEPS} steps, every parameter: {lib_vs_official:.1e}")
del reference

# %% [markdown]
# **The weight-decay name rule.** The official rule was written for OPT, whose norms are named
# `...layer_norm...`. Llama's (and so SmolLM2's) final norm is `model.norm`: the official rule
# decays it. The library's default `no_decay=("bias", "norm")` spares it; `OFFICIAL_NO_DECAY`
# reproduces the official rule. One step with $\lambda = 0.1$: with the official rule the library equals
# the reference bit for bit, and with its default it differs there and only there, by $\eta\lambda\theta$.

# %%
WD = 0.1
decayed = lambda name, rule: not any(s in name for s in rule)   # noqa: E731
rules_disagree = [n for n, _ in smol.named_parameters() if decayed(n, OFFICIAL_NO_DECAY) != decayed(n, MeZOStep().no_decay)]
print(f"official no_decay {OFFICIAL_NO_DECAY}, ours {MeZOStep().no_decay}; they disagree on: {rules_disagree}")

wd_config = TrainConfig(lr=LR_EQ, max_steps=1, weight_decay=WD, **constant)
with_official_rule, official_step = sst.base(), MeZOStep(eps=EPS, no_decay=OFFICIAL_NO_DECAY)
train(with_official_rule, eq_batches[:1], wd_config, step=official_step, progress=False)
with_our_rule = sst.base()
train(with_our_rule, eq_batches[:1], wd_config, step=MeZOStep(eps=EPS), progress=False)
official_wd = sst.base()
official_mezo(official_wd, official_step.seeds, [eq_batches[:1]], LR_EQ, EPS, weight_decay=WD)
wd_equal = all(torch.equal(p, q) for p, q in zip(with_official_rule.parameters(), official_wd.parameters()))
wd_differ = {n for (n, p), q in zip(with_our_rule.named_parameters(), official_wd.parameters()) if not torch.equal(p, q)}
gap = (with_our_rule.model.norm.weight - official_wd.model.norm.weight).detach()
expected_gap = LR_EQ * WD * smol.model.norm.weight.detach()
gap_ok = torch.allclose(gap, expected_gap, rtol=0, atol=4 * u * smol.model.norm.weight.abs().max().item())
print(f"λ = {WD:g}, one step: ours with the official rule vs the reference, max difference "
      f"{max((p - q).abs().max().item() for p, q in zip(with_official_rule.parameters(), official_wd.parameters())):.1e}; "
      f"ours by default differs on {sorted(wd_differ)}, by {gap.abs().max().item():.2e} (η λ θ: "
      f"{expected_gap.abs().max().item():.2e})")
del with_official_rule, with_our_rule, official_wd

# %%
# NBVAL_CHECK_OUTPUT
print(f"the library equals the official algorithm after {EQ_STEPS} full-parameter steps, bit for bit:",
      run.check("library_equals_official", lib_vs_official == 0.0))
print("on SmolLM2 the two name rules disagree only on the final norm:", run.check("rules_differ_on_model_norm",
                                                                               rules_disagree == ["model.norm.weight"]))
print("with OFFICIAL_NO_DECAY, weight decay as the official code, bit for bit:", run.check("official_weight_decay", wd_equal))
print("with the default rule, only model.norm differs, by η λ θ (within 4 ulps):",
      run.check("default_rule_spares_model_norm", wd_differ == {"model.norm.weight"} and gap_ok))
del library

# %% [markdown]
# ## 3. MeZO on LoRA and on prefix tuning: perturb only what trains
#
# `MeZOStep` perturbs and updates the parameters that require grad. On top of an adapter, $z$ lives in
# the adapter's few hundred thousand dimensions: the frozen weights are never touched, and each
# step draws far fewer random numbers. The official scripts use $\epsilon$ = 1e-2 for LoRA and
# 1e-1 for prefix tuning. Your step, given only the adapter's tensors, must again equal the
# library's; and after training, every frozen weight is bit-identical to SmolLM2's.

# %%
LORA = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])        # the official LoRA setting
PREFIX = PrefixTuningConfig(num_virtual_tokens=5)
frozen = {n: p for n, p in smol.named_parameters()}


def untouched(model):
    """Every weight of SmolLM2 is still there, frozen and bit-identical (LoRA keeps a wrapped W0 as ...base_layer...)."""
    kept = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    return kept.keys() == frozen.keys() and all(torch.equal(kept[n].cpu(), p) for n, p in frozen.items())


def with_adapter(config):
    torch.manual_seed(seed)                                   # the same adapter init every time
    return core.add_adapter(sst.base(), config)


mine_lora, lib_lora, lora_step = with_adapter(LORA), with_adapter(LORA), MeZOStep(eps=1e-2)
start_lora = {n: p.detach().clone() for n, p in lib_lora.named_parameters() if p.requires_grad}
seed_source = torch.Generator().manual_seed(seed)
for batch in eq_batches:
    my_mezo_step(trainable(mine_lora), loss_of(mine_lora, batch), 1e-3, 1e-2,
                 int(torch.randint(0, 10**9, (1,), generator=seed_source)))
train(lib_lora, eq_batches, TrainConfig(lr=1e-3, max_steps=EQ_STEPS, **constant), step=lora_step, progress=False)
lora_same = all(torch.equal(p, q) for p, q in zip(mine_lora.parameters(), lib_lora.parameters()))
lora_all_moved = all(not torch.equal(lib_lora.get_parameter(n), v) for n, v in start_lora.items())

prefixed = with_adapter(PREFIX)
start_prefix = {n: p.detach().clone() for n, p in prefixed.named_parameters() if p.requires_grad}
train(prefixed, eq_batches, TrainConfig(lr=1e-3, max_steps=EQ_STEPS, **constant), step=MeZOStep(eps=1e-1), progress=False)
prefix_moved = all(not torch.equal(prefixed.get_parameter(n), v) for n, v in start_prefix.items())
for name, model in (("LoRA r=8 (q, v)", lib_lora), ("prefix, 5 tokens", prefixed)):
    n_train = core.count_parameters(model)[0]
    print(f"{name}: z has {n_train:,d} entries per step ({n_train / n_params:.3%} of full-parameter MeZO's)")

# %%
# NBVAL_CHECK_OUTPUT
print("your step on LoRA's tensors gives the library's weights, bit for bit:", run.check("my_mezo_lora_equals_library", lora_same))
print("every LoRA and prefix tensor moved, and no weight of SmolLM2 did:",
      run.check("adapter_mezo_frozen_untouched", lora_all_moved and prefix_moved and untouched(lib_lora) and untouched(prefixed)))
del mine_lora, lib_lora, prefixed

# %% [markdown]
# ## 4. "MeZO needs the memory of inference", measured
#
# `training.memory.measure_step` runs one step on a real SST-2 batch (after one unmeasured step,
# where AdamW creates its state) and sorts every tensor alive at the step's peak into weights,
# gradients, optimizer state, activations (what autograd saved for backward) and other (the batch,
# the logits, temporaries). It counts tensor storages, so the CPU shows what a GPU would have to
# hold. The baseline is **inference**: one forward pass that computes the same loss under
# `torch.no_grad`, written as a `Step` so that the same meter measures it. Against it: MeZO on all
# parameters and on LoRA, and AdamW (backprop) on all parameters and on LoRA. Same batch, float32.

# %%
class InferenceOnly(Step):
    """Not training: one forward pass of the loss under no_grad, in eval mode (the paper's "inference")."""

    def setup(self, model, config):
        return trainable(model)

    @torch.no_grad()
    def __call__(self, model, batches, forward, lr_scale):
        model.eval()
        return StepResult(loss=forward(batches[0]).item(), grad_norm=float("nan"), lr=0.0)


mem_batch = next(iter(data.make_loader(sst.train_set, sst.batch, shuffle=True, seed=seed, pad_token_id=tok.pad_token_id)))
ways = {   # name: (model, step, whether the step has state to create in a first, unmeasured step)
    "inference (forward, no grad)": (sst.base, InferenceOnly, False),
    "MeZO, all parameters": (sst.base, lambda: MeZOStep(eps=1e-3), False),
    "MeZO, LoRA r=8": (lambda: with_adapter(LORA), lambda: MeZOStep(eps=1e-2), False),
    "AdamW, all parameters": (sst.base, BackpropStep, True),
    "AdamW, LoRA r=8": (lambda: with_adapter(LORA), BackpropStep, True),
}
memory = {}
for name, (make_model, make_step, stateful) in ways.items():
    memory[name] = measure_step(make_model(), [mem_batch], make_step(), TrainConfig(lr=1e-6, device="cpu"),
                                warmup_steps=1 if stateful else 0)

MB = 2**20
largest = max(p.numel() * p.element_size() for p in smol.parameters())
inference = memory["inference (forward, no grad)"]
rows = ["| | trained | weights | gradients | optimizer state | activations | other | **peak** | vs inference |",
        "|---|---|---|---|---|---|---|---|---|"]
for name, m in memory.items():
    rows.append(f"| {name} | {m.trained / 1e6:.2f}M | " + " | ".join(f"{m.at_peak[c] / MB:.0f}" for c in CATEGORIES)
                + f" | **{m.peak / MB:.0f} MB** | {m.peak / inference.peak:.2f} |")
display(Markdown("\n".join(rows) + f"\n\nMB alive at the peak of one step, batch {tuple(mem_batch['input_ids'].shape)} "
                 f"of SST-2 prompts; SmolLM2's largest tensor (its embedding, tied to the output head) is "
                 f"{largest / MB:.0f} MB."))

fig, ax = plt.subplots(figsize=(8.5, 3.2))
colours = dict(zip(CATEGORIES, ("#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc", "#d9d9d9")))
for i, (name, m) in enumerate(memory.items()):
    x0 = 0
    for c in CATEGORIES:
        ax.barh(i, m.at_peak[c] / MB, left=x0, color=colours[c], edgecolor="black", lw=0.5, label=c if i == 0 else None)
        x0 += m.at_peak[c] / MB
    ax.text(x0 * 1.01 + 5, i, f"{x0:.0f} MB", va="center", fontsize=8)
ax.set_yticks(range(len(memory)), list(memory)); ax.invert_yaxis()
ax.set_xlim(0, 1.18 * max(m.peak for m in memory.values()) / MB)
ax.set_xlabel("MB alive at the peak of one step (float32)")
ax.set_title("SmolLM2-135M: inference, MeZO and AdamW" if len(smol.model.layers) == 30 else
             f"SmolLM2's first {len(smol.model.layers)} layers: inference, MeZO and AdamW")
ax.legend(fontsize=7, loc="lower right"); plt.tight_layout(); plt.show()

# %%
# NBVAL_CHECK_OUTPUT
mezo = memory["MeZO, all parameters"]
print("MeZO holds no gradient, no optimizer state and no saved activation:",
      run.check("mezo_no_grad_state_activations",
                mezo.most["gradients"] == 0 == mezo.after["optimizer state"] and mezo.most["activations"] == 0))
print("MeZO's peak exceeds inference's by at most one z of the largest tensor:",
      run.check("mezo_peak_at_most_inference_plus_one_z", mezo.peak <= inference.peak + largest))

# %% [markdown]
# **The memory claims, by the rule.** The paper's "same memory footprint as inference" is the ratio
# of the two peaks. We take "the same" as within 10%. Its "up to 12x" less than backprop fine-tuning
# is the peak of an AdamW step over the peak of a MeZO step.

# %%
adamw = memory["AdamW, all parameters"]
as_inference = mezo.peak / inference.peak
_ = run.verdict("mezo_memory_as_inference", verdicts.exact(as_inference, "measured tensors of one step"), at_most=1.1,
                ours=f"SmolLM2, float32, batch {tuple(mem_batch['input_ids'].shape)}: peak {mezo.peak / MB:.0f} MB (MeZO) vs "
                     f"{inference.peak / MB:.0f} MB (one inference forward), ratio {as_inference:.3f}; MeZO on LoRA "
                     f"{memory['MeZO, LoRA r=8'].peak / inference.peak:.3f}")
reduction = adamw.peak / mezo.peak
_ = run.verdict("mezo_memory_vs_finetuning", verdicts.exact(reduction, "measured tensors of one step"), at_least=12.0,
                ours=f"peak {adamw.peak / MB:.0f} MB (AdamW, all parameters) vs {mezo.peak / MB:.0f} MB (MeZO): "
                     f"{reduction:.2f}x; AdamW on LoRA {memory['AdamW, LoRA r=8'].peak / mezo.peak:.2f}x")


def at_paper_precision(m, state_factor):
    """The measured parts with fp16 weights, gradients, activations and other (half) and fp32 optimizer state."""
    a = m.at_peak
    return 0.5 * (a["weights"] + a["gradients"] + a["activations"] + a["other"]) + state_factor * a["optimizer state"]


mixed = at_paper_precision(adamw, 1.5) / at_paper_precision(mezo, 0.0)   # AdamW: fp32 master copy + m + v = 12 B
print(f"AdamW / MeZO: {reduction:.2f}x measured in float32; {mixed:.2f}x at fp16 weights with fp32 Adam state "
      "(an arithmetic on our measurement, not a measurement)")
print(f"per parameter: AdamW keeps {(adamw.at_peak['weights'] + adamw.at_peak['gradients'] + adamw.at_peak['optimizer state']) / n_params:.1f} "
      f"bytes of weights, gradients and state, MeZO {mezo.at_peak['weights'] / n_params:.1f}; the most activations AdamW's "
      f"step saved for backward at once: {adamw.most['activations'] / MB:.0f} MB")

# %% [markdown]
# **One step further, the 12x.** In float32, AdamW holds 16 bytes per parameter before any
# activation (weight, gradient, two moments) and MeZO 4: that bounds the reduction near 4x, plus
# what the activations add. Our SST-2 prompts are short (a few dozen tokens), so the activations are
# small. The paper's largest reduction comes from fp16 weights (MeZO: 2 bytes per parameter) against
# mixed-precision Adam (fp16 weights and gradients, plus fp32 master weights and moments: 16 bytes),
# and from long prompts whose activations grow with the batch and the sequence. The fp16
# re-computation above shows the first effect; the second would need longer sequences (exercise 3).

# %% [markdown]
# ## 5. SST-2: zero-shot, in-context learning, MeZO, fine-tuning (Table 1 in miniature)
#
# One task (`tasks.LabelWords`), the same validation sentences, four ways to use SmolLM2:
#
# * **zero-shot**: the instruction alone, the model unchanged;
# * **in-context learning (ICL)**: `K_ICL` demonstrations (review and answer) from the training
#   sentences, in front of each question, drawn at random (as the paper's) from each class among the
#   rows of 5 to 25 words: SST-2's training rows include phrases down to single words, which make
#   weak demonstrations;
# * **MeZO**: the forward-only step on LoRA r = 8 (q, v; $\epsilon$ = 1e-2, the official LoRA
#   setting), for `MEZO_STEPS` steps. In the cpu profile that is twice the backprop run's steps,
#   which takes about its wall time (a MeZO step costs two forward passes, a backprop step about
#   three forwards' worth and an optimizer update; the table gives the measured seconds): the
#   comparison is at equal wall time. The gpu profile gives MeZO ten times FT's steps, towards the
#   paper's regime of many more steps. (An earlier cpu run with 96 steps, three times the time,
#   is not the committed one: the notebook must fit in 10 minutes.) The rate is constant, as in the
#   official scripts, and picked from a small grid by accuracy on the selection split. On a CPU, a
#   full-parameter MeZO step is dominated by drawing 135M normal numbers four times, and costs
#   several times a LoRA one. So full-parameter MeZO trains only in the gpu profile;
# * **fine-tuning (FT)**: backprop with AdamW on every parameter, the task's steps and schedule, its
#   own grid (`tasks.lrs(sst, "full")`) picked on the same split.
#
# All are scored by rank classification of the two label words at the answer position
# (`tasks.label_word_correct`), one 1/0 per sentence, so each difference gets a paired bootstrap
# interval. Why not MiniLM (`tasks.SST2`), the encoder of notebooks 01 and 06, as in the paper's
# RoBERTa experiments? A sequence classifier adds a freshly initialised head, so its zero-shot
# accuracy is chance by construction, and ICL is not defined for it. Posing the task as a label word
# is what makes the first two rows of Table 1 exist.

# %%
K_ICL = run.pick(smoke=2, cpu=4, gpu=16)
MEZO_STEPS = run.pick(smoke=4, cpu=32, gpu=5000)        # cpu: about FT's wall time; gpu: 10x FT's steps
mezo_grid = run.pick(smoke=(3e-4,), cpu=(3e-4, 1e-3), gpu=(3e-5, 1e-4, 3e-4))
full_mezo_grid = run.pick(smoke=(), cpu=(), gpu=(1e-6, 3e-6, 1e-5))       # full-parameter MeZO (gpu only, see above)

train_rows = data.load_sst2("train", n=sst.n_train + sst.n_select, seed=sst.seed).select(range(sst.n_train))  # the training sentences
draw = random.Random(seed)


def demonstrations_of(label):
    rows = [i for i in range(len(train_rows)) if train_rows[i]["label"] == label]
    sentences = [i for i in rows if 5 <= len(train_rows[i]["text"].split()) <= 25]
    return draw.sample(sentences if len(sentences) >= K_ICL // 2 else rows, K_ICL // 2)   # smoke: few rows


per_class = [demonstrations_of(c) for c in (0, 1)]
demos = [train_rows[i] for pair in zip(*per_class) for i in pair]          # negative, positive, negative, ...


def icl_example(row):
    """The task's question with K_ICL answered demonstrations in front of it, in the same user turn."""
    shots = "".join(f"{q}\n{a}\n\n" for q, a in map(sst.example_fn, demos))
    question, answer = sst.example_fn(row)
    return shots + question, answer


print("one ICL prompt (before the chat template):\n" + icl_example(sst.val_rows[0])[0])
accuracy = lambda c: sum(c) / len(c)                                   # noqa: E731
zero_shot = sst.correct(smol)
icl = tasks.label_word_correct(smol, tok, sst.val_rows, icl_example, sst.words)
print(f"\nzero-shot {accuracy(zero_shot):.3f}, ICL with {K_ICL} demonstrations {accuracy(icl):.3f}, majority class "
      f"{sst.majority():.3f} ({sst.n_val} validation sentences)")

# %%
def fit_mezo(model, lr, eps, desc):
    """MeZO on the task's sentences, batch and seed, MEZO_STEPS steps at a constant rate."""
    loader = data.make_loader(sst.train_set, sst.batch, shuffle=True, seed=sst.seed, pad_token_id=tok.pad_token_id)
    return train(model, loader, TrainConfig(lr=lr, max_steps=MEZO_STEPS, warmup_ratio=0.0, schedule="constant", seed=seed),
                 step=MeZOStep(eps=eps), desc=desc)


def sweep(make_model, grid, fit):
    last_loss = {}                  # each rate's training loss at its last step

    def fit_and_score(lr):
        model = make_model()
        hist = fit(model, lr)
        last_loss[lr] = hist.loss[-1]
        return accuracy(sst.correct(model, "select")), (model, hist)
    lr, (model, hist), select = tasks.pick_lr(fit_and_score, grid)
    return dict(lr=lr, hist=hist, select=select, correct=sst.correct(model), model=model, last_loss=last_loss)


runs = {"MeZO (LoRA)": sweep(lambda: with_adapter(LORA), mezo_grid,
                             lambda m, lr: fit_mezo(m, lr, 1e-2, f"SST-2 MeZO LoRA, lr {lr:g}"))}
if full_mezo_grid:
    runs["MeZO (all parameters)"] = sweep(sst.base, full_mezo_grid,
                                          lambda m, lr: fit_mezo(m, lr, 1e-3, f"SST-2 MeZO full, lr {lr:g}"))
runs["FT (AdamW, all parameters)"] = sweep(sst.base, tasks.lrs(sst, "full"),
                                           lambda m, lr: sst.fit(m, lr, desc=f"SST-2 full fine-tuning, lr {lr:g}"))
mezo_run, ft_run = runs["MeZO (LoRA)"], runs["FT (AdamW, all parameters)"]
lora_frozen_ok = untouched(mezo_run["model"])
for r in runs.values():
    del r["model"]

rows = ["| | trained | steps of batch " + str(sst.batch) + " | passes per step | training time | "
        "lr: selection accuracy → picked | validation accuracy |", "|---|---|---|---|---|---|---|",
        f"| zero-shot | 0 | 0 | | | | {accuracy(zero_shot):.3f} |",
        f"| ICL, {K_ICL} demonstrations | 0 | 0 | | | | {accuracy(icl):.3f} |"]
for name, r in runs.items():
    passes = "2 forward" if name.startswith("MeZO") else "forward + backward"
    rows.append(f"| {name} | {r['hist'].trainable_params / 1e6:.2f}M | {len(r['hist'].step)} | {passes} | "
                f"{r['hist'].elapsed_s[-1]:.0f} s | "
                + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in r["select"].items()) + f" → **{r['lr']:g}** | "
                f"{accuracy(r['correct']):.3f} |")
time_ratio = mezo_run["hist"].elapsed_s[-1] / ft_run["hist"].elapsed_s[-1]
display(Markdown("\n".join(rows) + f"\n\n{sst.n_train} training sentences, {sst.n_select} for selection, {sst.n_val} "
                 f"validation sentences; majority class {sst.majority():.3f}. Training time: the picked run's, "
                 f"evaluation excluded; MeZO trained {time_ratio:.2f}x as long as FT."))

fig, ax = plt.subplots(figsize=(7, 3.2))
for name, r in runs.items():
    ax.plot(r["hist"].step, r["hist"].loss, label=f"{name}, lr {r['lr']:g}", alpha=0.8)
ax.set(xlabel="optimizer step", ylabel="training loss (MeZO: (ℓ₊ + ℓ₋)/2)", title="SmolLM2 on SST-2 (label word)")
ax.legend(fontsize=8); plt.tight_layout(); plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("MeZO on LoRA left every weight of SmolLM2 bit-identical:", run.check("mezo_lora_training_frozen_untouched", lora_frozen_ok))

# %%
vs_zero = verdicts.mean_difference(mezo_run["correct"], zero_shot, what="validation sentences")
vs_ft = verdicts.mean_difference(mezo_run["correct"], ft_run["correct"], what="validation sentences")
vs_icl = verdicts.mean_difference(mezo_run["correct"], icl, what="validation sentences")
scale = (f"SmolLM2-135M, {sst.n_train} sentences; MeZO on LoRA {MEZO_STEPS} steps (lr {mezo_run['lr']:g}), "
         f"FT {sst.steps} steps (lr {ft_run['lr']:g})")
_ = run.verdict("mezo_beats_zero_shot", vs_zero, at_least=0.0,
                ours=f"{scale}: MeZO {accuracy(mezo_run['correct']):.3f} vs zero-shot {accuracy(zero_shot):.3f}; "
                     f"ICL ({K_ICL} demonstrations) {accuracy(icl):.3f}")
_ = run.verdict("mezo_close_to_finetuning", vs_ft, at_least=-0.01,
                ours=f"{scale}: MeZO {accuracy(mezo_run['correct']):.3f} vs FT {accuracy(ft_run['correct']):.3f}")
for label, iv in (("accuracy(MeZO) − accuracy(zero-shot)", vs_zero), ("accuracy(MeZO) − accuracy(ICL)", vs_icl),
                  ("accuracy(MeZO) − accuracy(FT)", vs_ft)):
    print(f"{label:38s} {iv}  ({iv.method})")

# %% [markdown]
# ## Paper vs ours
#
# Each row: the claim with the paper's numbers (`references/claims.toml`), ours, and the verdict of
# the rule. The paper trains OPT-13B on 1,000 examples for 20,000 MeZO steps; ours is SmolLM2-135M
# with a few dozen sentences and a few dozen steps on a CPU (thousands in the gpu profile).

# %%
display(run.verdict_table())

# %% [markdown]
# **One step further, where a claim does not hold here.** The cell below reads this run's numbers:
# whether the MeZO loss was still falling when the run stopped, and how far the best MeZO rate is
# from the edge of its grid.

# %%
def quarter_means(losses):
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


lines = []
first, last = quarter_means(mezo_run["hist"].loss)
ft_first, ft_last = quarter_means(ft_run["hist"].loss)
for claim in ("mezo_beats_zero_shot", "mezo_close_to_finetuning", "mezo_memory_as_inference"):
    if run.verdicts[claim]["verdict"] == "reproduced":
        continue
    if claim == "mezo_memory_as_inference":
        lines.append(f"- Memory vs inference ({run.verdicts[claim]['verdict']}): MeZO's peak is {as_inference:.3f}x "
                     f"inference's; its only extra tensor is one z, at most the largest tensor ({largest / MB:.0f} MB).")
        continue
    lines.append(f"- `{claim}` ({run.verdicts[claim]['verdict']}): MeZO's training loss fell from {first:.3f} (first "
                 f"quarter of its {MEZO_STEPS} steps) to {last:.3f} (last quarter), "
                 + ("still falling when the run stopped" if last < first else "not falling")
                 + f"; FT's from {ft_first:.3f} to {ft_last:.3f} in {sst.steps} steps. The best MeZO rate, "
                 f"{mezo_run['lr']:g}, is " + ("the only one tried." if len(mezo_grid) == 1 else
                                               "the largest of the grid, so a larger one might do better."
                                               if mezo_run["lr"] == max(mezo_grid) else
                                               "the smallest of the grid, so a smaller one might do better."
                                               if mezo_run["lr"] == min(mezo_grid) else "inside the grid.")
                 + " By selection accuracy: " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in mezo_run["select"].items())
                 + f" (training loss after {MEZO_STEPS} steps: " + ", ".join(
                     f"{lr:g}: {loss:.3f}" for lr, loss in mezo_run["last_loss"].items()) + ")."
                 + " The paper runs MeZO for 20,000 steps (a number recalled, not read) on a model 100x larger; "
                   "by its analysis the Hessian's effective rank, not the size, sets MeZO's pace. More steps (the "
                   "gpu profile runs 5,000) are the next test.")
display(Markdown("\n".join(lines) if lines else "Every testable claim holds in this run; nothing further to chase."))

# %% [markdown]
# ## Exercises
#
# Answers, with code that runs, in [`solutions/13_mezo_solutions.ipynb`](solutions/13_mezo_solutions.ipynb).
#
# 1. The perturbation scale $\epsilon$: on the tiny network of section 1, how does the error of the
#    mean of 1,000 estimates change from $\epsilon$ = 1e-1 to 1e-7, in float64 and in float32? Why
#    does it rise at both ends?
# 2. The n-SPSA estimate (`MeZOStep(n=...)`) averages n directions per step at n times the forward
#    passes. At a fixed budget of forward passes, is n = 4 with a quarter of the steps better than
#    n = 1?
# 3. Measure the memory of MeZO and AdamW again on a batch of longer sequences. How does the
#    AdamW / MeZO ratio move, and which part of AdamW's peak grows?
# 4. Give backprop the same LoRA adapter MeZO trained (AdamW on LoRA r = 8, the task's steps): is the
#    gap between MeZO and FT one of the optimizer or of what is trained?

# %%
_ = run.save(metrics={
    "equivalence": {"my_mezo_vs_library": 0.0 if same_weights else None, "library_vs_official": lib_vs_official,
                    "replay_gap": replay_gap, "restore": {"bit_exact": exact, "max_abs": drift, "max_units": units,
                                                           "max_logits": logit_drift}},
    "estimate": {str(n): {"relative_error": e, "cosine": c} for n, (e, c) in curve.items()}, "d_mlp": d,
    "memory_mb": {name: {"peak": m.peak / MB, **{c: m.at_peak[c] / MB for c in CATEGORIES}, "trained": m.trained}
                  for name, m in memory.items()},
    "mezo_vs_inference": as_inference, "adamw_vs_mezo": reduction, "adamw_vs_mezo_at_fp16": mixed,
    "sst2": {"zero_shot": accuracy(zero_shot), "icl": accuracy(icl), "k_icl": K_ICL, "majority": sst.majority(),
             **{name: {"lr": r["lr"], "select": r["select"], "accuracy": accuracy(r["correct"]), "steps": len(r["hist"].step),
                       "wall_time_s": r["hist"].wall_time_s, "loss_first_quarter": quarter_means(r["hist"].loss)[0],
                       "loss_last_quarter": quarter_means(r["hist"].loss)[1]} for name, r in runs.items()},
             "intervals": {"mezo_minus_zero_shot": vs_zero.to_dict(), "mezo_minus_icl": vs_icl.to_dict(),
                           "mezo_minus_ft": vs_ft.to_dict()}, "n_val": sst.n_val,
             "correct": {"zero-shot": zero_shot, "ICL": icl, **{name: r["correct"] for name, r in runs.items()}}},
})
