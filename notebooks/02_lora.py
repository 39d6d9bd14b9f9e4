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
# # 02 · LoRA: Low-Rank Adaptation
#
# Fine-tuning changes a pretrained weight $W_0 \in \mathbb{R}^{d_{out}\times d_{in}}$ by some
# $\Delta W$. Hu et al. (2021) hypothesise that this update has a low *intrinsic rank*, freeze $W_0$
# and learn only a rank-$r$ factorisation of the update (their Eq. 3):
#
# $$h = W_0 x + \frac{\alpha}{r} B A x, \qquad A \in \mathbb{R}^{r\times d_{in}},\; B \in \mathbb{R}^{d_{out}\times r},\; r \ll \min(d_{in}, d_{out}).$$
#
# $B$ starts at zero, so training starts from the pretrained model; $A$ starts random. After
# training, $BA$ can be added into $W_0$, so inference costs nothing extra.
#
# In this notebook you build the layer yourself, check that the library's `LoRALinear` computes the
# same thing, prove the library equal to `peft` on SmolLM2, then test three of the paper's claims:
# LoRA matches full fine-tuning (E2E NLG with SmolLM2, SST-2 with MiniLM), and the learned update has
# a very low rank and amplifies directions that $W_0$ does not emphasise (Section 7).

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
import copy
import math
import tempfile

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torch import nn

from peft_from_scratch import bib, core, equivalence, figures, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.notebook import start
from peft_from_scratch.reparameterized.lora import LoRAConfig, LoRALinear
from peft import PeftModel

run = start("02_lora", profile, seed, results_dir)
bib.paper_card("hu2021lora",
               claim="Adapting only W_q and W_v with a rank-8 update (well under 1% of the parameters) matches full "
                     "fine-tuning on E2E NLG and SST-2; the learned A's top direction is shared across ranks, and the "
                     "update emphasises directions of W that W itself does not (Section 7).")

# %% [markdown]
# ## Where LoRA sits
#
# In each decoder layer of SmolLM2 the paper's choice adapts the query and value projections. The
# frozen layer (grey) computes what it always did; beside each adapted projection runs the thin
# branch $x \mapsto \frac{\alpha}{r} B A x$ (orange), added to its output. SmolLM2 uses grouped-query
# attention, so $W_v$ maps 576 features to 192 (3 key/value heads of 64).

# %%
fig, ax = figures.canvas(11, 8, "LoRA (r = 8) on q_proj and v_proj of a SmolLM2 decoder layer")
at = figures.llama_block(ax)
figures.side_branch(ax, at["v_proj"], "A  (8 x 576)", "B  (192 x 8)", label="+ (α/r) B A x")
figures.side_branch(ax, at["q_proj"], "A  (8 x 576)", "B  (576 x 8)", side="left", dx=0.4)
figures.legend(ax, 8.3, 0.3)
plt.show()

# %% [markdown]
# ## 1. Build it
#
# A LoRA layer in a few lines: the frozen $W_0$, the two factors, the scaling $s = \alpha / r$. $A$
# starts Kaiming-uniform (as `nn.Linear` initialises its weights, and as peft and the official code
# do; the paper says Gaussian), $B$ starts at zero.

# %%
class MyLoRA(nn.Module):
    def __init__(self, W0: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.W0 = W0.requires_grad_(False)                              # frozen, d_out x d_in
        self.A = nn.Parameter(torch.empty(r, W0.in_features))           # r x d_in
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(W0.out_features, r))          # d_out x r: BA = 0 at the start
        self.s = alpha / r

    def forward(self, x):                                               # x: (..., d_in)
        return self.W0(x) + self.s * (x @ self.A.T) @ self.B.T          # never forms B A (d_out x d_in)


torch.manual_seed(seed)
W0 = nn.Linear(576, 576, bias=False)                                    # the shape of SmolLM2's q_proj
mine = MyLoRA(copy.deepcopy(W0), r=8, alpha=16)
library = LoRALinear(copy.deepcopy(W0), r=8, alpha=16)
with torch.no_grad():                                                   # same weights in: A, and a "trained" B
    library.lora.A.copy_(mine.A)
    mine.B.normal_(std=0.02)
    library.lora.B.copy_(mine.B)
x = torch.randn(3, 7, 576, requires_grad=True)
x2 = x.detach().clone().requires_grad_()
out_mine, out_lib = mine(x), library(x2)
out_mine.square().sum().backward()
out_lib.square().sum().backward()
same = dict(outputs=torch.allclose(out_mine, out_lib, rtol=1e-6, atol=1e-6),
            grad_A=torch.allclose(mine.A.grad, library.lora.A.grad, rtol=1e-5, atol=1e-6),
            grad_B=torch.allclose(mine.B.grad, library.lora.B.grad, rtol=1e-5, atol=1e-6),
            grad_x=torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6))
merged = library.base_layer.weight + library.delta_weight()             # W0 + (alpha/r) B A
same["merged_weight"] = torch.allclose(x2.detach() @ merged.T, out_lib.detach(), rtol=1e-5, atol=1e-5)
print(f"W0: {W0.weight.numel():,d} weights; LoRA r=8: r (d_in + d_out) = {mine.A.numel() + mine.B.numel():,d} trained "
      f"({100 * (mine.A.numel() + mine.B.numel()) / W0.weight.numel():.2f}%)")

# %%
# NBVAL_CHECK_OUTPUT
for what, ok in same.items():
    print(f"your LoRA and the library's LoRALinear agree on {what} (float32, 1e-5): {run.check(f'my_lora_equals_library_{what}', ok)}")

# %% [markdown]
# ## 2. The library against peft, on SmolLM2
#
# `peft_io.twin` builds our LoRA and peft's `LoraConfig` on two copies of SmolLM2, gives ours
# "trained" values (B random) and copies every adapter tensor into peft through our peft key mapping.
# Both then take five AdamW steps on the same real E2E batches: the logits at every step, every
# gradient at the first step and every parameter after the last must agree within rtol 1e-5,
# atol 1e-6 x the tensor's largest entry (`equivalence.compare`). Then the files: ours saved in
# peft's format loads with `PeftModel.from_pretrained`, peft's loads into ours, and merging folds
# $BA$ into $W_0$ and back.

# %%
e2e = tasks.E2E.for_run(run)
smol = e2e.base()
config = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])   # the paper's choice: W_q and W_v
eq_batches = list(e2e.loader(e2e.train_set.select(range(run.pick(smoke=2, cpu=4, gpu=8)))))
ours, theirs, pairs = peft_io.twin(smol, config, perturb=peft_io.random_B(0.02, seed))
report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=5, lr=1e-3, rtol=1e-5, atol=1e-6)
print(report.table())

ids = eq_batches[0]["input_ids"]
with tempfile.TemporaryDirectory() as d, torch.no_grad():
    peft_io.save_peft_adapter(ours, f"{d}/ours")
    theirs.save_pretrained(f"{d}/peft")
    in_peft = PeftModel.from_pretrained(e2e.base(), f"{d}/ours").eval()
    in_ours = peft_io.load_peft_adapter(e2e.base(), f"{d}/peft").eval()
    logits = ours(input_ids=ids).logits
    files = {"ours_loads_in_peft": (in_peft(input_ids=ids).logits - logits).abs().max().item() < 1e-5,
             "peft_loads_in_ours": (in_ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item() < 1e-5}
    W_before = {n: l.base_layer.weight.clone() for n, l in core.adapter_layers(ours).items()}
    core.merge_adapter(ours)
    files["merged_equals_adapter"] = (ours(input_ids=ids).logits - logits).abs().max().item() < 1e-4
    core.unmerge_adapter(ours)
    files["unmerge_restores_W0"] = max((l.base_layer.weight - W_before[n]).abs().max().item()
                                       for n, l in core.adapter_layers(ours).items()) < 1e-6
del in_peft, in_ours, ours, theirs, pairs

# %%
# NBVAL_CHECK_OUTPUT
print(report.verdict())
run.check("lora_matches_peft_logits_grads_and_5_steps", report.passed)
for what, ok in files.items():
    print(f"{what}: {run.check(what, ok)}")

# %% [markdown]
# ## 3. SmolLM2 on E2E NLG: LoRA against full fine-tuning
#
# The task (`tasks.E2E`) fixes the data, the batch and the number of optimizer steps for every
# method. Each method gets the same kind of learning-rate sweep, scored on a selection split of the
# E2E development set that neither training nor testing uses, and is then evaluated on the test MRs
# with all their references: BLEU, and the held-out loss. Full fine-tuning
# (`tasks.full_finetuning_e2e`) is computed once per run with its own sweep and read from the run's
# results folder by every notebook that compares with it. peft's LoRA is trained too, by the same
# loop at the same learning rate: its loss curve must be ours, step for step.

# %%
print("data:", bib.cite("novikova2017e2e"), "| model:", bib.cite("allal2025smollm2"))

# %%
def fit_lora(lr):
    model = core.add_adapter(e2e.base(), config)
    hist = e2e.fit(model, lr, desc=f"E2E LoRA r=8, lr {lr:g}")
    return e2e.select_loss(model), (model, hist)


lora_lr, (lora_e2e, lora_hist), lora_sweep = tasks.pick_lr(fit_lora, tasks.lrs(e2e, "adapter"), higher_is_better=False)
full = tasks.full_finetuning_e2e(e2e, run.results_dir)
lora_hyps = e2e.generate(lora_e2e)
e2e_result = {"LoRA": dict(lr=lora_lr, bleu=e2e.bleu(lora_hyps), test_loss=e2e.test_loss(lora_e2e),
                           trainable=core.count_parameters(lora_e2e)[0]),
              "full fine-tuning": dict(lr=full["lr"], bleu=full["bleu"], test_loss=full["test_loss"],
                                       trainable=full["trainable_params"])}
zero_shot_loss = e2e.test_loss(smol)

ours_again, peft_model, _ = peft_io.twin(smol, config)   # fresh adapters, peft's A copied from ours, B = 0
same_curve = e2e.fit(ours_again, lora_lr, desc="E2E LoRA (ours), again").loss == \
    e2e.fit(peft_model, lora_lr, desc="E2E LoRA (peft)").loss
del peft_model, ours_again

print(f"LoRA learning rates (selection loss): " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in lora_sweep.items()))
print(f"full fine-tuning learning rates (selection loss): " + ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in full["select_loss"].items())
      + ("  [read from this run's results folder]" if full["cached_from"] else "  [computed here]"))
for name, r in e2e_result.items():
    print(f"{name:17s} lr {r['lr']:g}: BLEU {r['bleu']:.1f}, test loss {r['test_loss']:.3f}, {r['trainable']:,d} trained")
print(f"zero-shot test loss {zero_shot_loss:.3f}")
print(f"\nMR: {e2e.test_rows[0]['mr']}\n  LoRA: {lora_hyps[0]}\n  full: {full['hyps'][0]}")

# %%
print("ours and peft, same loop and lr: identical training loss at every step:", run.check("same_loop_same_losses_as_peft", same_curve))
learned = e2e_result["LoRA"]["test_loss"] < zero_shot_loss
print("LoRA's test loss is below the zero-shot loss:", run.check("lora_learns_e2e", learned) if run.profile != "smoke" else
      f"{learned} (not a check in the smoke profile: {e2e.steps} steps, the first at lr 0, need not lower it)")

# %%
plt.figure(figsize=(6, 3))
plt.plot(lora_hist.step, lora_hist.loss, label=f"LoRA r=8 (lr {lora_lr:g})")
plt.xlabel("optimizer step"); plt.ylabel("training loss"); plt.title("SmolLM2 on E2E"); plt.legend()
plt.tight_layout(); plt.show()
bleu_gap = tasks.bleu_difference(e2e, lora_hyps, full["hyps"])
_ = run.verdict("lora_e2e_on_par_with_full_ft", bleu_gap, at_least=-1.0,
            ours=f"SmolLM2-135M, r=8 on q,v ({e2e_result['LoRA']['trainable']:,d} trained): BLEU {e2e_result['LoRA']['bleu']:.1f} "
                 f"vs full fine-tuning {full['bleu']:.1f}, {e2e.steps} steps each, lr from the same sweep; "
                 f"{e2e.n_test} test MRs")

# %% [markdown]
# ## 4. MiniLM on SST-2, at two ranks
#
# LoRA on `query` and `value` of all six layers, plus the new classifier head (trained fully, as
# peft's `modules_to_save` does for classification), at r = 8 and r = 64 with α = 2r, against full
# fine-tuning on the same task (`tasks.SST2`: same sentences, same steps, its own sweep). The gap in
# accuracy gets a paired bootstrap interval over the validation sentences.

# %%
print("data:", bib.cite("socher2013recursive"), "| model:", bib.cite("wang2020minilm"))

# %%
sst = tasks.SST2.for_run(run)


def lora_sst2(r, lr):
    model = core.add_adapter(sst.base(), LoRAConfig(r=r, alpha=2 * r, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    sst.fit(model, lr, desc=f"SST-2 LoRA r={r}, lr {lr:g}")
    return model


def fit_and_select(lr):
    model = lora_sst2(8, lr)
    return sum(sst.correct(model, "select")) / sst.n_select, model


sst_lr, lora8, sst_sweep = tasks.pick_lr(fit_and_select, tasks.lrs(sst, "adapter"))
lora64 = lora_sst2(64, sst_lr)
full_sst = tasks.full_finetuning_sst2(sst, run.results_dir)
correct = {"LoRA r=8": sst.correct(lora8), "LoRA r=64": sst.correct(lora64), "full fine-tuning": full_sst["correct"]}
trained = {"LoRA r=8": core.count_parameters(lora8)[0], "LoRA r=64": core.count_parameters(lora64)[0],
           "full fine-tuning": full_sst["trainable_params"]}
for name, c in correct.items():
    print(f"{name:17s} accuracy {sum(c) / len(c):.3f} with {trained[name]:,d} trained parameters")
print(f"majority class {sst.majority():.3f}; LoRA lr {sst_lr:g} (selection accuracy "
      + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sst_sweep.items()) + f"); full fine-tuning lr {full_sst['lr']:g}")
acc_gap = verdicts.mean_difference(correct["LoRA r=8"], correct["full fine-tuning"], what="validation sentences")
_ = run.verdict("lora_sst2_on_par_with_full_ft", acc_gap, at_least=-0.01,
            ours=f"MiniLM, r=8 on query,value + head ({trained['LoRA r=8']:,d} trained): "
                 f"{sum(correct['LoRA r=8']) / len(correct['LoRA r=8']):.3f} vs full fine-tuning "
                 f"{full_sst['accuracy']:.3f}, {sst.steps} steps each")

# %%
plt.figure(figsize=(5, 3))
for name in correct:
    plt.semilogx([trained[name]], [sum(correct[name]) / len(correct[name])], "o", label=name)
plt.axhline(sst.majority(), ls=":", color="grey", label="majority class")
plt.xlabel("trained parameters"); plt.ylabel("SST-2 validation accuracy"); plt.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Section 7 in miniature: what the update looks like
#
# **Subspace similarity (the paper's Figure 3).** With $U_{r}$ the right-singular vectors of the
# learned $A_r$ (the directions of the input it reads), the paper measures how much of the top-$i$
# directions of $A_8$ lie in the top-$j$ directions of $A_{64}$:
# $\phi(A_8, A_{64}, i, j) = \lVert U_8^{i\top} U_{64}^{j} \rVert_F^2 / \min(i, j) \in [0, 1]$; two random
# subspaces give about $j/d$. We use the query projection of MiniLM's middle layer. The two runs start
# from different random $A$, so any overlap beyond chance was learned.

# %%
def right_singular(A):
    return torch.linalg.svd(A.detach().double(), full_matrices=False).Vh.T     # d_in x r


name = "bert.encoder.layer.3.attention.self.query"
U8, U64 = (right_singular(m.get_submodule(name).lora.A) for m in (lora8, lora64))
d_in = U8.shape[0]
phi = torch.tensor([[(U8[:, :i].T @ U64[:, :j]).pow(2).sum().item() / min(i, j) for j in range(1, 65)] for i in range(1, 9)])
plt.figure(figsize=(8, 2.2))
plt.imshow(phi, aspect="auto", cmap="viridis", extent=[0.5, 64.5, 8.5, 0.5]); plt.colorbar()
plt.xlabel("j (directions of A, r=64)"); plt.ylabel("i (r=8)"); plt.title(f"phi(A8, A64, i, j), {name}")
plt.tight_layout(); plt.show()
print(f"phi(1,1) = {phi[0, 0]:.3f} (chance: 1/d = {1 / d_in:.4f}); phi(8,64) = {phi[7, 63]:.3f} (chance: 64/d = {64 / d_in:.3f})")
_ = run.verdict("lora_top_direction_shared_across_ranks", verdicts.exact(phi[0, 0].item(), "one training run per rank (seed 0)"),
            at_least=0.5, ours=f"MiniLM layer-3 query: phi(1,1) = {phi[0, 0]:.3f}, chance {1 / d_in:.4f}")

# %% [markdown]
# **How ΔW relates to W (the paper's Table 7), with the paper's protocol.** Take the update
# $\Delta W = \frac{\alpha}{r}BA$ of the r = 8 run and its top-$r$ left and right singular vectors $U, V$;
# project $W$ onto them: $\lVert U^\top W V^\top\rVert_F$. Compare with $W$'s own top-$r$ directions, and with
# random $r$-dimensional subspaces (we draw 200 and report the ratio's median with a 95% interval over
# the draws). The paper finds the update's directions correlate with $W$ more than random ones, yet
# far less than $W$'s own top directions: $\Delta W$ amplifies what $W$ has but does not emphasise.

# %%
lay = lora8.get_submodule(name)
W, dW = lay.base_layer.weight.detach().double(), lay.delta_weight().detach().double()
r = 8
U, _, Vh = torch.linalg.svd(dW)
Uw, _, Vhw = torch.linalg.svd(W)
proj_dw = (U[:, :r].T @ W @ Vh[:r].T).norm().item()
proj_w = (Uw[:, :r].T @ W @ Vhw[:r].T).norm().item()
g = torch.Generator().manual_seed(seed)
random_proj = sorted((torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=torch.float64))[0].T @ W
                      @ torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=torch.float64))[0]).norm().item()
                     for _ in range(200))
ratio = lambda p: proj_dw / p   # noqa: E731
vs_random = verdicts.Interval(ratio(random_proj[100]), ratio(random_proj[194]), ratio(random_proj[5]),
                              "200 random subspaces: median and 2.5-97.5% of the ratio")
amplification = dW.norm().item() / proj_dw
display(Markdown("| subspace of | ‖UᵀWVᵀ‖_F |\n|---|---|\n"
                 f"| ΔW (its top-{r}) | {proj_dw:.3f} |\n| W (its own top-{r}) | {proj_w:.3f} |\n"
                 f"| random (median of 200) | {random_proj[100]:.3f} |\n\n"
                 f"‖W‖_F = {W.norm():.2f}, ‖ΔW‖_F = {dW.norm():.3f}; amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F = "
                 f"{amplification:.2f} (the paper: about 21.5 for GPT-3 after full training; it grows with the "
                 f"size of the update, so a {sst.steps}-step run says little about it)."))
_ = run.verdict("lora_delta_w_correlates_with_w", vs_random, at_least=1.0,
            ours=f"{proj_dw:.3f} for ΔW against {random_proj[100]:.3f} for a random subspace (median)")
_ = run.verdict("lora_delta_w_not_w_top_directions", verdicts.exact(proj_dw / proj_w, "one training run (seed 0)"), at_most=0.1,
            ours=f"{proj_dw:.3f} for ΔW against {proj_w:.3f} for W's own top directions")

# %% [markdown]
# ## Paper vs ours
#
# Each row: the claim with the paper's numbers (`references/claims.toml`), ours, and the verdict of
# the rule. Our models are 3-1000x smaller than the paper's and train for a few dozen steps on a CPU;
# what can carry over is the *shape* of the result.

# %%
display(run.verdict_table())

# %% [markdown]
# ## Exercises
#
# Answers, with code that runs, in [`solutions/02_lora_solutions.ipynb`](solutions/02_lora_solutions.ipynb).
#
# 1. Put LoRA on all linear layers (`target_modules="all-linear"`) at r = 2. How many parameters does
#    it train, against r = 8 on `query`, `value`? Which does better on SST-2 at the same steps (the
#    paper's Table 5 question)?
# 2. With `use_rslora=True` the update is scaled by $\alpha/\sqrt{r}$ instead of $\alpha/r$. At a fixed α,
#    how does the size of the update after the same training change from r = 8 to r = 64 under each
#    scaling, and why does $\alpha/\sqrt r$ keep it stable?
# 3. Compute φ(A8, A64, 1, 1) for `value` instead of `query`, and for the first and last layers.
# 4. The paper initialises A from a Gaussian; peft uses Kaiming-uniform. Train with `init="gaussian"`:
#    does the SST-2 result move by more than the bootstrap interval?

# %%
_ = run.save(metrics={
    "e2e": {**{k: {kk: vv for kk, vv in v.items()} for k, v in e2e_result.items()}, "zero_shot_test_loss": zero_shot_loss,
            "lora_lr_sweep": {str(k): v for k, v in lora_sweep.items()}, "steps": e2e.steps, "n_test": e2e.n_test},
    "sst2": {name: {"accuracy": sum(c) / len(c), "trainable": trained[name]} for name, c in correct.items()}
    | {"lora_lr": sst_lr, "full_lr": full_sst["lr"], "steps": sst.steps},
    "equivalence": {k: {"max_abs": d.abs, "max_rel": d.rel} for k, d in report.diffs.items()},
    "phi_1_1": phi[0, 0].item(), "phi_8_64": phi[7, 63].item(), "projection": {"dW": proj_dw, "W": proj_w,
                                                                                "random_median": random_proj[100]},
    "amplification": amplification,
})
