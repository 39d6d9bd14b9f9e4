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
# This notebook builds the layer, proves it equal to `peft`'s LoRA on SmolLM2 (same weights in,
# same logits, gradients and parameters after five AdamW steps out), fine-tunes SmolLM2 on E2E NLG
# and MiniLM on SST-2 against full fine-tuning (notebook 01) and against peft trained by the same
# loop, and repeats the paper's Section 7 analysis in miniature.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (CI), "cpu" (about 10 minutes), "gpu" (the full run), or "auto"
seed = 0
results_dir = "results"

# %%
import copy
import inspect

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from peft import PeftModel

from peft_from_scratch import bib, core, data, equivalence, evaluate, models
from peft_from_scratch.blocks.lowrank import LowRank
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.reparameterized.lora import LoRAConfig, LoRALinear
from peft_from_scratch.notebook import load_results, start
from peft_from_scratch.training import TrainConfig, evaluate_loss, train

run = start("02_lora", profile, seed, results_dir)
bib.paper_card("hu2021lora",
               claim="A rank-r update BA on the attention weights, with W0 frozen, matches full fine-tuning with a "
                     "small fraction of the trainable parameters; the learned update has a very low intrinsic rank "
                     "and amplifies directions that W0 does not emphasise (Section 7).",
               notebook_profile=run.profile)

# %% [markdown]
# ## 1. One layer
#
# `LoRALinear` wraps a frozen `nn.Linear`. Its forward is the equation above, computed as two thin
# matrix products so $BA$ ($d_{out}\times d_{in}$) is never formed:

# %%
print(inspect.getsource(LowRank.product))
print(inspect.getsource(LoRALinear.forward))

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(seed)
W0 = torch.nn.Linear(576, 576, bias=False)              # the size of SmolLM2's q_proj
layer = LoRALinear(copy.deepcopy(W0), r=8, alpha=16)
x = torch.randn(3, 576)
print(f"frozen W0: {W0.weight.numel():,d} weights; LoRA r=8: r*(d_in + d_out) = {layer.lora.A.numel() + layer.lora.B.numel():,d} "
      f"({100 * (layer.lora.A.numel() + layer.lora.B.numel()) / W0.weight.numel():.2f}%)")
print("B = 0 at init, so the output equals W0 x:", torch.equal(layer(x), W0(x)))
torch.nn.init.normal_(layer.lora.B, std=0.02)                # pretend we trained
merged = layer.base_layer.weight + layer.delta_weight()  # W0 + (alpha/r) B A
print("merged weight gives the same output:", torch.allclose(x @ merged.T, layer(x), atol=1e-6))

# %% [markdown]
# ## 2. Proof against peft on SmolLM2
#
# `peft_io.twin` builds our LoRA and peft's `LoraConfig` on two copies of the same base, gives ours
# "trained" values (B random), and copies every adapter tensor into peft through our peft key
# mapping. Then both models run five AdamW steps on the same real E2E batches.

# %%
smol, tok = models.load_model(models.SMOLLM2)
smol.to(run.torch_device)
config = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])  # the paper's choice: W_q and W_v
e2e_rows = data.load_e2e("train", n=run.pick(smoke=4, cpu=8, gpu=8), seed=seed)
eq_batches = list(data.make_loader(data.tokenize_causal(e2e_rows, tok, data.e2e_example, max_length=192), 2,
                                   pad_token_id=tok.pad_token_id))
ours, theirs, pairs = peft_io.twin(smol, config, perturb=peft_io.random_B(0.02, seed))
report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=5, lr=1e-3, rtol=1e-5, atol=1e-6)
print(report.table())

# %%
# NBVAL_CHECK_OUTPUT
print(report.verdict())

# %% [markdown]
# Saved in peft's format, our adapter loads with `PeftModel.from_pretrained`, and peft's loads
# into ours; merging folds $BA$ into $W_0$ and unmerging gives $W_0$ back.

# %%
import tempfile

ids = eq_batches[0]["input_ids"]
with tempfile.TemporaryDirectory() as d:
    peft_io.save_peft_adapter(ours, f"{d}/ours")
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(smol), f"{d}/ours").eval()
    theirs.save_pretrained(f"{d}/peft")
    ours_loaded = peft_io.load_peft_adapter(copy.deepcopy(smol), f"{d}/peft").eval()
with torch.no_grad():
    ours.eval(); theirs.eval()
    logits = ours(input_ids=ids).logits
    ours_to_peft = (peft_loaded(input_ids=ids).logits - logits).abs().max().item()
    peft_to_ours = (ours_loaded(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    W_before = {n: l.base_layer.weight.clone() for n, l in core.adapter_layers(ours).items()}
    core.merge_adapter(ours)
    merged_diff = (ours(input_ids=ids).logits - logits).abs().max().item()
    core.unmerge_adapter(ours)
    unmerge_diff = max((l.base_layer.weight - W_before[n]).abs().max().item() for n, l in core.adapter_layers(ours).items())
del peft_loaded, ours_loaded, theirs

# %%
# NBVAL_CHECK_OUTPUT
print("ours saved -> PeftModel.from_pretrained, same logits (atol 1e-5):", ours_to_peft < 1e-5)
print("peft saved -> ours, same logits (atol 1e-5):", peft_to_ours < 1e-5)
print("merged model equals the adapter model (atol 1e-4):", merged_diff < 1e-4)
print("unmerge gives W0 back (atol 1e-6):", unmerge_diff < 1e-6)

# %% [markdown]
# ## 3. SmolLM2 on E2E NLG: LoRA vs peft's LoRA vs full fine-tuning
#
# Same data, same loop and the same number of steps as the full fine-tuning baseline of notebook
# 01; LoRA on $W_q, W_v$ with r = 8, α = 16. LoRA takes a larger learning rate than full fine-tuning
# (the paper uses 2e-4 over 5 epochs; our runs are a few dozen steps). Ours and peft's start from
# the same A (copied) and are trained by the same loop, so their curves should lie on top of each
# other.

# %%
gen_cfg = run.pick(
    smoke=dict(n_train=16, n_test=8, batch=4, epochs=1, lr=1e-3, new_tokens=32),   # data, batch and epochs
    cpu=dict(n_train=384, n_test=64, batch=8, epochs=1, lr=1e-3, new_tokens=48),   # as notebook 01's
    gpu=dict(n_train=4672, n_test=630, batch=16, epochs=2, lr=5e-4, new_tokens=64),
)
train_ds = data.tokenize_causal(data.load_e2e("train", n=gen_cfg["n_train"], seed=seed), tok, data.e2e_example, max_length=192)
test_rows = data.load_e2e("test", n=gen_cfg["n_test"], seed=seed)
test_loader = data.make_loader(data.tokenize_causal(test_rows, tok, data.e2e_example, max_length=192), 16,
                               pad_token_id=tok.pad_token_id)
prompts = [data.e2e_example(r)[0] for r in test_rows]
zero_shot_loss = evaluate_loss(smol, test_loader)
lora_e2e, peft_e2e, _ = peft_io.twin(smol, config)   # fresh adapters, A copied, B = 0
results = {}
for label, model in [("ours", lora_e2e), ("peft", peft_e2e)]:
    hist = train(model, data.make_loader(train_ds, gen_cfg["batch"], shuffle=True, seed=seed, pad_token_id=tok.pad_token_id),
                 TrainConfig(lr=gen_cfg["lr"], epochs=gen_cfg["epochs"], seed=seed), desc=f"E2E LoRA ({label})")
    hyps = evaluate.generate(model, tok, prompts, max_new_tokens=gen_cfg["new_tokens"])
    results[label] = dict(hist=hist, bleu=evaluate.corpus_bleu(hyps, list(test_rows["refs"])),
                          loss=evaluate_loss(model, test_loader), hyps=hyps)
e2e_trainable, e2e_total = core.count_parameters(lora_e2e)
print(f"trainable: {e2e_trainable:,d} of {e2e_total:,d} ({100 * e2e_trainable / e2e_total:.3f}%)")
for label, r in results.items():
    print(f"{label}: BLEU {r['bleu']:.1f}, test loss {r['loss']:.3f}, {r['hist'].tokens_per_s:.0f} tokens/s")
print(f"\nMR: {test_rows[0]['mr']}\n  LoRA: {results['ours']['hyps'][0]}")

# %%
baseline = load_results("01_full_finetuning", "results")   # the committed run of notebook 01
same_profile = baseline["profile"] == run.profile
fig, ax = plt.subplots(figsize=(6, 3))
results["ours"]["hist"].plot(ax, label="LoRA (ours)")
ax.plot(results["peft"]["hist"].step, results["peft"]["hist"].loss, "--", label="LoRA (peft)")
ax.set_title("SmolLM2 on E2E: training loss"); ax.legend(); plt.tight_layout(); plt.show()
curves_identical = results["ours"]["hist"].loss == results["peft"]["hist"].loss
print("ours and peft: identical training losses at every step:", curves_identical)
print(f"full fine-tuning (notebook 01, {baseline['profile']} profile): BLEU {baseline['metrics']['e2e']['bleu_after']:.1f}, "
      f"test loss {baseline['metrics']['e2e']['eval_loss_after']:.3f}, {baseline['metrics']['e2e']['trainable_params']:,d} trainable")

# %% [markdown]
# ## 4. MiniLM on SST-2, and the rank
#
# LoRA on `query` and `value` of all six layers plus the new classifier head (trained fully, as
# peft's `modules_to_save` does for classification), at r = 8 and r = 64, same loop and data as the
# full fine-tuning baseline.

# %%
cls_cfg = run.pick(smoke=dict(n_train=128, n_val=128, epochs=1), cpu=dict(n_train=4000, n_val=872, epochs=2),
                   gpu=dict(n_train=8000, n_val=872, epochs=5))  # the epochs of notebook 01, per profile
minilm, mtok = models.load_model(models.MINILM, num_labels=2)
sst_train = data.tokenize_classification(data.load_sst2("train", n=cls_cfg["n_train"], seed=seed), mtok, max_length=64)
sst_val = data.tokenize_classification(data.load_sst2("validation", n=cls_cfg["n_val"], seed=seed), mtok, max_length=64)
val_loader = data.make_loader(sst_val, 64, pad_token_id=mtok.pad_token_id)
sst = {}
for r in (8, 64):
    model = core.add_adapter(copy.deepcopy(minilm), LoRAConfig(r=r, alpha=2 * r, target_modules=["query", "value"],
                                                               modules_to_save=["classifier"]))
    hist = train(model, data.make_loader(sst_train, 32, shuffle=True, seed=seed, pad_token_id=mtok.pad_token_id),
                 TrainConfig(lr=5e-4, epochs=cls_cfg["epochs"], seed=seed), desc=f"SST-2 LoRA r={r}")
    sst[r] = dict(model=model, accuracy=evaluate.accuracy(model, val_loader), trainable=core.count_parameters(model)[0])
    print(f"r={r}: accuracy {sst[r]['accuracy']:.3f} with {sst[r]['trainable']:,d} trainable parameters")

# %%
ft = baseline["metrics"]["sst2"]
plt.figure(figsize=(5, 3))
plt.semilogx([sst[r]["trainable"] for r in sst], [sst[r]["accuracy"] for r in sst], "o-", label="LoRA r=8, 64")
plt.semilogx([ft["trainable_params"]], [ft["accuracy_after"]], "s", label=f"full fine-tuning (nb 01, {baseline['profile']})")
plt.xlabel("trainable parameters"); plt.ylabel("SST-2 validation accuracy"); plt.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Section 7 in miniature: what the update looks like
#
# **Subspace similarity (the paper's Figure 3).** With $U_{r}$ the right-singular vectors of the
# learned $A_r$, the paper measures how much of the top-$i$ directions of $A_8$ lie in the top-$j$
# directions of $A_{64}$:
# $\phi(A_8, A_{64}, i, j) = \lVert U_8^{i\top} U_{64}^{j} \rVert_F^2 / \min(i, j) \in [0, 1]$. For two random
# subspaces it is about $j/d$. We use the query projection of MiniLM's middle layer. (The two runs
# start from different random A, so any overlap beyond chance was learned.)

# %%
def right_singular(A):
    return torch.linalg.svd(A.detach().double(), full_matrices=False).Vh.T     # d_in x r


name = "bert.encoder.layer.3.attention.self.query"
U8, U64 = (right_singular(sst[r]["model"].get_submodule(name).lora.A) for r in (8, 64))
d_in = U8.shape[0]
phi = torch.tensor([[(U8[:, :i].T @ U64[:, :j]).pow(2).sum().item() / min(i, j) for j in range(1, 65)] for i in range(1, 9)])
plt.figure(figsize=(8, 2.2))
plt.imshow(phi, aspect="auto", cmap="viridis", extent=[0.5, 64.5, 8.5, 0.5]); plt.colorbar()
plt.xlabel("j (directions of A, r=64)"); plt.ylabel("i (r=8)"); plt.title(f"phi(A8, A64, i, j) for {name}")
plt.tight_layout(); plt.show()
print(f"phi(1,1) = {phi[0, 0]:.3f}; a random pair of directions gives about 1/d = {1 / d_in:.4f}")
print(f"phi(8,64) = {phi[7, 63]:.3f}; random subspaces give about 64/d = {64 / d_in:.3f}")

# %% [markdown]
# **How ΔW relates to W (the paper's Table 7).** Project $W$ onto the $r$-dimensional subspace of
# $\Delta W$ ($U^\top W V^\top$ with $U, V$ the top-$r$ singular vectors of $\Delta W$) and compare with
# a random subspace and with $W$'s own top directions. A small $\lVert U^\top W V^\top\rVert_F$ means ΔW
# amplifies directions W does not emphasise; the amplification factor is
# $\lVert\Delta W\rVert_F / \lVert U^\top W V^\top\rVert_F$.

# %%
lay = sst[8]["model"].get_submodule(name)
W, dW = lay.base_layer.weight.detach().double(), lay.delta_weight().detach().double()
r = 8
U, _, Vh = torch.linalg.svd(dW)
Uw, _, Vhw = torch.linalg.svd(W)
g = torch.Generator().manual_seed(seed)
Ur, _ = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=torch.float64))
Vr, _ = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=torch.float64))
proj = {"ΔW": (U[:, :r].T @ W @ Vh[:r].T).norm().item(), "W (own top-r)": (Uw[:, :r].T @ W @ Vhw[:r].T).norm().item(),
        "random": (Ur.T @ W @ Vr).norm().item()}
amplification = dW.norm().item() / proj["ΔW"]
display(Markdown("| subspace of | ‖UᵀWVᵀ‖_F |\n|---|---|\n" + "\n".join(f"| {k} | {v:.3f} |" for k, v in proj.items())
                 + f"\n\n‖W‖_F = {W.norm():.2f}, ‖ΔW‖_F = {dW.norm():.3f}, amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F = {amplification:.2f}"))

# %% [markdown]
# ## Paper vs. ours

# %%
ft_e2e = baseline["metrics"]["e2e"]
display(Markdown(f"""
| | paper | ours ({run.profile} profile, {run.device}) |
|---|---|---|
| E2E BLEU, LoRA | 70.4 (GPT-2 M, r=4, 0.35M params) | {results['ours']['bleu']:.1f} (SmolLM2-135M, r=8 on q,v, {e2e_trainable:,d} params, {len(results['ours']['hist'].step)} steps) |
| E2E BLEU, full fine-tuning | 68.2 (GPT-2 M, 354.9M params) | {ft_e2e['bleu_after']:.1f} (notebook 01, {baseline['profile']} profile) |
| SST-2 accuracy, LoRA | 95.1 (RoBERTa-base) | {sst[8]['accuracy']:.3f} (MiniLM, r=8), {sst[64]['accuracy']:.3f} (r=64) |
| SST-2 accuracy, full fine-tuning | (GLUE average 86.4 vs LoRA 87.2, RoBERTa-base) | {ft['accuracy_after']:.3f} (notebook 01, {baseline['profile']} profile) |
| ours = peft (logits, gradients, 5 AdamW steps) | | {report.passed} (max relative difference {max(d.rel for d in report.diffs.values()):.1e}) |
| φ(A8, A64, 1, 1) | far above chance (GPT-3, Figure 3) | {phi[0, 0]:.3f} (chance ≈ {1 / d_in:.4f}) |
"""))

# %% [markdown]
# The paper's numbers come from models 3-1000x larger trained for thousands of steps; ours from a
# ten-minute CPU run. What carries over is the *shape* of the result: LoRA with well under 1% of
# the parameters lands near full fine-tuning, and its update concentrates in few directions.
#
# ## Exercises
#
# 1. Put LoRA on all linear layers (`target_modules="all-linear"`) at r = 2. Does it beat r = 8 on
#    q, v at a similar parameter count (the paper's Table 5 question)?
# 2. Set `use_rslora=True` and compare r = 8 with r = 64 at the same α. Why does α/√r keep the
#    update's scale stable as r grows?
# 3. Compute φ(A8, A64, i, j) for `value` instead of `query`, and for the first and last layers.
# 4. The paper initialises A from a Gaussian; peft uses Kaiming-uniform. Try `init="gaussian"`.

# %%
claims = {
    "lora_matches_peft_logits_grads_and_5_steps": report.passed,
    "saved_adapter_loads_in_peft_with_same_logits": ours_to_peft < 1e-5,
    "peft_adapter_loads_in_ours_with_same_logits": peft_to_ours < 1e-5,
    "merged_equals_unmerged": merged_diff < 1e-4,
    "unmerge_restores_base_weights": unmerge_diff < 1e-6,
    "same_loop_gives_identical_losses_for_ours_and_peft": curves_identical,
    "lora_trains_under_1_percent_of_smollm2": e2e_trainable / e2e_total < 0.01,
    "e2e_test_loss_below_zero_shot": results["ours"]["loss"] < zero_shot_loss,
}
if run.profile != "smoke":  # claims about what training learned need more than a few steps
    claims["lora_e2e_bleu_within_5_of_full_finetuning"] = same_profile and results["ours"]["bleu"] > ft_e2e["bleu_after"] - 5
    claims["lora_sst2_within_3_points_of_full_finetuning"] = same_profile and sst[8]["accuracy"] > ft["accuracy_after"] - 0.03
    claims["top_direction_overlap_above_chance"] = phi[0, 0].item() > 10 / d_in
run.save(
    metrics={"e2e": {"bleu": results["ours"]["bleu"], "bleu_peft": results["peft"]["bleu"], "test_loss": results["ours"]["loss"], "zero_shot_test_loss": zero_shot_loss,
                     "trainable_params": e2e_trainable, "steps": len(results["ours"]["hist"].step),
                     "tokens_per_s": results["ours"]["hist"].tokens_per_s},
             "sst2": {f"accuracy_r{r}": sst[r]["accuracy"] for r in sst} | {f"trainable_r{r}": sst[r]["trainable"] for r in sst},
             "equivalence": {k: {"max_abs": d.abs, "max_rel": d.rel} for k, d in report.diffs.items()},
             "phi_1_1": phi[0, 0].item(), "phi_8_64": phi[7, 63].item(), "amplification": amplification,
             "baseline_profile": baseline["profile"]},
    claims=claims,
)
