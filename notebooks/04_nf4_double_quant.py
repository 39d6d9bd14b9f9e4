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
# # 04 · NF4 and double quantization: storing a model in 4 bits
#
# QLoRA (Dettmers et al., 2023) fine-tunes a model whose frozen weights are stored in 4 bits. Before
# the fine-tuning (notebook 05) comes the storage format, and this notebook is about that alone:
#
# 1. **Block-wise absmax quantization.** Cut the flattened weight into blocks of 64 values; keep one
#    float32 constant $c_b = \max|W_b|$ per block and, per value, the 4-bit index of the code value
#    nearest to $W/c_b$. Dequantization is $\hat W = \text{code}[q]\cdot c_b$.
# 2. **NormalFloat4 (NF4).** Pretrained weights are roughly normally distributed, so put the 16
#    code values at *quantiles* of $N(0,1)$: every level then gets an equal share of the weights.
# 3. **Double quantization (DQ).** The constants cost $32/64 = 0.5$ bit per weight. Quantize them
#    again, to 8 bits in blocks of 256: $8/64 + 32/(64\cdot256) \approx 0.127$ bit.
#
# We derive NF4 cell by cell, check that our code is bit-exact with `bitsandbytes` on SmolLM2's real
# weights, measure the error of Int4, FP4, NF4 and NF4+DQ on those weights and the perplexity of the
# 4-bit models (the paper's Table 2 in miniature), and count the bits.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (CI), "cpu" (about 10 minutes), "gpu" (the full run), or "auto"
seed = 0
results_dir = "results"

# %%
import copy
import inspect
import math

import bitsandbytes.functional as BF
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from peft_from_scratch import bib, core, data, evaluate, models
from peft_from_scratch.quantized import linear4bit, nf4
from peft_from_scratch.notebook import start

torch._dynamo.config.disable = True   # bnb wraps some CPU ops in torch.compile: seconds per new shape; run eagerly
run = start("04_nf4_double_quant", profile, seed, results_dir)
bib.paper_card("dettmers2023qlora",
               claim="NormalFloat4 (quantiles of a normal distribution) with block-wise absmax and double "
                     "quantization stores weights in about 4.127 bits per parameter, bit-exact with bitsandbytes, with "
                     "less error than Int4 and FP4 (the paper's Table 2 ranks them by perplexity: Int4 34.34 > "
                     "FP4 31.07 > NF4+DQ 27.41).",
               notebook_profile=run.profile)

# %% [markdown]
# ## 1. NF4 from the quantiles of a normal distribution
#
# The paper's idea (its Eq. 4): with $Q_X$ the quantile function of $N(0,1)$, choose code values so
# that each of the $2^k$ bins holds the same probability mass, then scale them to $[-1, 1]$ (the
# range of $W/c_b$). Two details make the real table:
#
# * **an exact zero.** Padding and zero weights must stay zero, and a symmetric 16-level code has no
#   zero. So NF4 is asymmetric: 8 positive levels from the quantiles of one half, 7 negative from
#   the other half, and 0.
# * **the outermost quantile.** $Q_X(1) = \infty$, so the largest level sits at a probability
#   `offset` slightly below 1: the mean of the symmetric choices for 15 and 16 levels,
#   $\tfrac12\big[(1 - \tfrac{1}{2\cdot15}) + (1-\tfrac{1}{2\cdot16})\big]$.

# %%
offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
print(f"offset = {offset:.7f}")
p_pos = torch.linspace(offset, 0.5, 9)[:-1]       # 8 probabilities from offset down to (not incl.) 1/2
p_neg = torch.linspace(offset, 0.5, 8)[:-1]       # 7 for the negative half
print("positive-side probabilities:", [f"{p:.4f}" for p in p_pos.tolist()])
q_pos = torch.special.ndtri(p_pos.double())       # Q_X(p): the normal quantile function
q_neg = -torch.special.ndtri(p_neg.double())
levels = torch.cat([q_neg, torch.zeros(1, dtype=torch.float64), q_pos]).sort().values
print("unscaled levels (standard deviations):", [f"{v:+.3f}" for v in levels.tolist()])
nf4_levels = levels / levels.max()
print("NF4 = levels / max:", [f"{v:+.4f}" for v in nf4_levels.tolist()])

# %% [markdown]
# The library's `nf4_code` is this construction, with the rounding bitsandbytes used when it
# generated its table (offset to 7 decimals, float32 probabilities, float32 before the division);
# then every one of the 16 values is equal bit for bit to bitsandbytes' hard-coded table.

# %%
print(inspect.getsource(nf4.nf4_code).split('"""')[-1])

# %%
# NBVAL_CHECK_OUTPUT
bnb_nf4 = BF.get_4bit_type("nf4", device="cpu")
print("our derivation above agrees with bnb's table to 1e-6:", torch.allclose(nf4_levels.float(), bnb_nf4, atol=1e-6))
print("nf4.nf4_code() == bitsandbytes get_4bit_type('nf4'), bit for bit:", torch.equal(nf4.nf4_code(), bnb_nf4))
print("nf4.fp4_code() == bitsandbytes get_4bit_type('fp4'), bit for bit:",
      torch.equal(nf4.fp4_code(), BF.get_4bit_type("fp4", device="cpu")))
print("NF4 has an exact zero, 7 negative and 8 positive levels:",
      (nf4.nf4_code() == 0).sum().item() == 1 and (nf4.nf4_code() < 0).sum().item() == 7)

# %% [markdown]
# ## 2. Why quantiles: what SmolLM2's weights look like after block scaling
#
# Cut a real weight matrix into blocks of 64, divide each block by its absmax, and plot the values
# against the 16 levels of each 4-bit type. NF4 spends its levels where the weights are; Int4's
# even grid wastes levels in the sparse tails; FP4 (E2M1, bitsandbytes' variant) bunches them near
# zero and leaves a wide gap below ±1.

# %%
smol, tok = models.load_model(models.SMOLLM2)
smol.eval()
linear_names = core.find_targets(smol, "all-linear")
name = "model.layers.15.self_attn.q_proj"
W = smol.get_submodule(name).weight.detach()
blocks = W.reshape(-1, 64)
scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)
codes = {"Int4": nf4.int4_code(), "FP4": nf4.fp4_code(), "NF4": nf4.nf4_code()}
fig, axes = plt.subplots(1, 3, figsize=(12, 2.8), sharey=True)
for ax, (label, code) in zip(axes, codes.items()):
    ax.hist(scaled.numpy(), bins=200, density=True, color="0.6")
    for v in code.unique().tolist():
        ax.axvline(v, color="C3", lw=0.8)
    ax.set_title(f"{label}: 16 levels"); ax.set_xlabel("W / block absmax")
axes[0].set_ylabel("density")
fig.suptitle(f"SmolLM2 {name} ({W.shape[0]}x{W.shape[1]}), blocks of 64", y=1.02)
plt.tight_layout(); plt.show()

# share of the values each NF4 level receives (nearest-level assignment)
share = torch.bincount(torch.bucketize(scaled, (nf4.nf4_code()[1:] + nf4.nf4_code()[:-1]) / 2), minlength=16).float()
share /= share.sum()
print("share of values per NF4 level:", " ".join(f"{s:.3f}" for s in share.tolist()))
print(f"(a perfectly equal split would be {1 / 16:.3f}; the ±1 levels hold the one absmax value of each block)")

# %% [markdown]
# ## 3. Bit-exact with bitsandbytes on SmolLM2's weights
#
# `nf4.quantize_4bit` against `bitsandbytes.functional.quantize_4bit` (what `BitsAndBytesConfig`
# calls when it loads a model) on real linear weights, with and without double quantization: the
# packed bytes (two indices per byte, first in the high nibble), the block constants, the nested
# state (offset, second-level absmax and code) and the dequantized weights must all be *equal*,
# not close.

# %%
exact_layers = run.pick(smoke=[n for n in linear_names if n.startswith("model.layers.0.")],
                        cpu=linear_names, gpu=linear_names)
checks = {"packed bytes": True, "absmax": True, "nested state (offset, absmax2, code2)": True, "dequantized": True}
for n in exact_layers:
    Wn = smol.get_submodule(n).weight.detach()
    for dq in (False, True):
        packed, state = nf4.quantize_4bit(Wn, "nf4", 64, double_quant=dq)
        bpacked, bstate = BF.quantize_4bit(Wn, blocksize=64, quant_type="nf4", compress_statistics=dq)
        checks["packed bytes"] &= torch.equal(packed, bpacked)
        checks["absmax"] &= torch.equal(state.absmax, bstate.absmax)
        if dq:
            checks["nested state (offset, absmax2, code2)"] &= (torch.equal(state.offset, bstate.offset)
                                                                and torch.equal(state.absmax2, bstate.state2.absmax)
                                                                and torch.equal(state.code2, bstate.state2.code))
        checks["dequantized"] &= torch.equal(nf4.dequantize_4bit(packed, state),
                                             BF.dequantize_4bit(bpacked, bstate).reshape(Wn.shape))
print(f"compared {len(exact_layers)} of SmolLM2's {len(linear_names)} linear layers "
      f"({sum(smol.get_submodule(n).weight.numel() for n in exact_layers):,d} weights), each with and without DQ")

# %%
# NBVAL_CHECK_OUTPUT
for what, ok in checks.items():
    print(f"{what:40s} identical to bitsandbytes: {ok}")
bit_exact = all(checks.values())

# %% [markdown]
# ## 4. Four 4-bit copies of SmolLM2
#
# `linear4bit.quantize_model` swaps linear layers for `Linear4bit` layers that keep the packed codes and
# dequantize at every forward. We make four copies: Int4 (symmetric, -7..7), FP4 (E2M1, as
# bitsandbytes), NF4, and NF4 with double-quantized constants, all in blocks of 64. In the cpu and gpu
# profiles every linear layer is quantized (all but the output head, which shares its weights with
# the embedding); the smoke profile quantizes only the first two transformer blocks, to stay fast.

# %%
quant_layers = run.pick(smoke=[n for n in linear_names if n.startswith(("model.layers.0.", "model.layers.1."))],
                        cpu=linear_names, gpu=linear_names)
types = {"Int4": ("int4", False), "FP4": ("fp4", False), "NF4": ("nf4", False), "NF4+DQ": ("nf4", True)}
quantized = {t: linear4bit.quantize_model(copy.deepcopy(smol), quant_layers, quant_type=qt, double_quant=dq)
             for t, (qt, dq) in types.items()}
print(f"quantized {len(quant_layers)} of {len(linear_names)} linear layers in each copy")
print(quantized["NF4+DQ"].get_submodule(quant_layers[0]))

# %% [markdown]
# ### Quantization error on the real weights
#
# Mean squared error and relative error $\lVert \hat W - W\rVert_F / \lVert W \rVert_F$ over the
# quantized layers, with $\hat W$ what each `Linear4bit` dequantizes.

# %%
sq_err = {t: 0.0 for t in types}
sq_norm, n_weights = 0.0, 0
for n in quant_layers:
    Wn = smol.get_submodule(n).weight.detach()
    sq_norm += Wn.double().pow(2).sum().item()
    n_weights += Wn.numel()
    for t in types:
        sq_err[t] += (quantized[t].get_submodule(n).dequantize() - Wn).double().pow(2).sum().item()
mse = {t: e / n_weights for t, e in sq_err.items()}
rel = {t: math.sqrt(e / sq_norm) for t, e in sq_err.items()}
display(Markdown("| type | MSE | relative error |\n|---|---|---|\n"
                 + "\n".join(f"| {t} | {mse[t]:.3e} | {rel[t]:.4f} |" for t in types)
                 + f"\n\n{len(quant_layers)} layers, {n_weights:,d} weights."))
print("order by weight MSE (best first):", " < ".join(sorted(mse, key=mse.get)))

# %%
# NBVAL_CHECK_OUTPUT
print("NF4 has a lower MSE than Int4:", mse["NF4"] < mse["Int4"])
print("NF4 has a lower MSE than FP4:", mse["NF4"] < mse["FP4"])
print("double quantization changes the relative error by less than 1%:", abs(rel["NF4+DQ"] / rel["NF4"] - 1) < 0.01)

# %% [markdown]
# Look at the order of the other two: by weight MSE, Int4 comes out ahead of FP4 on these weights,
# as on Gaussian ones (`tests/test_nf4.py`): bitsandbytes' FP4 spends a level on ±0.0052 and leaves a
# gap of 1/3 below ±1. The paper ranks FP4 above Int4 by *perplexity* (Table 2), which is a different
# measure: it weighs each error by how much it hurts the model's predictions, and errors on small
# weights matter less. The next section measures that.
#
# ## 5. Perplexity of the 4-bit models (Table 2 in miniature)
#
# The perplexity of each copy on held-out text, Shakespeare (which no notebook trains on).

# %%
ppl_cfg = run.pick(smoke=dict(n_blocks=4, block=128), cpu=dict(n_blocks=24, block=256), gpu=dict(n_blocks=128, block=256))
text_blocks = data.lm_chunks(data.load_text("tinyshakespeare"), tok, block_size=ppl_cfg["block"], n_blocks=ppl_cfg["n_blocks"])
ppl = {"float32": evaluate.perplexity(smol, text_blocks)} | {t: evaluate.perplexity(quantized[t], text_blocks) for t in types}
display(Markdown("| weights | perplexity | vs float32 |\n|---|---|---|\n"
                 + "\n".join(f"| {t} | {p:.2f} | {p / ppl['float32']:.3f}x |" for t, p in ppl.items())
                 + f"\n\n{text_blocks.numel():,d} tokens of tinyshakespeare in blocks of {ppl_cfg['block']}; "
                 f"{len(quant_layers)} of {len(linear_names)} linear layers quantized."))
print("order by perplexity (best first):", " < ".join(sorted(types, key=ppl.get)))
plt.figure(figsize=(5, 2.6))
plt.bar(list(ppl), list(ppl.values()), color=["0.5", "C0", "C1", "C2", "C2"])
plt.ylabel("perplexity"); plt.title("SmolLM2 on tinyshakespeare"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 6. How many bits per weight?
#
# Computed: 4 bits per weight plus the constants, $32/64 = 0.5$ without double quantization, and
# $8/64 + 32/(64\cdot 256)$ with it. Measured: `linear4bit.model_nbytes` adds up the bytes of every
# stored tensor (packed codes, absmax, and with DQ absmax2 and the offset) of the quantized
# model's linear layers; divide by the number of weights they stand for.

# %%
n_linear = sum(smol.get_submodule(n).weight.numel() for n in quant_layers)
bits = {}
for t in ("NF4", "NF4+DQ"):
    dq = types[t][1]
    bits[t] = {"computed": nf4.bits_per_parameter(64, double_quant=dq),
               "measured": 8 * linear4bit.model_nbytes(quantized[t]) / n_linear}
display(Markdown("| | computed bits/weight | measured bits/weight |\n|---|---|---|\n"
                 + "\n".join(f"| {t} | {b['computed']:.4f} | {b['measured']:.4f} |" for t, b in bits.items())))
float_linear_mb = 4 * n_linear / 2**20
print(f"{len(quant_layers)} quantized linear layers: {n_linear:,d} weights, {float_linear_mb:.0f} MB in float32, "
      f"{linear4bit.model_nbytes(quantized['NF4+DQ']) / 2**20:.1f} MB in NF4+DQ "
      f"({float_linear_mb * 2**20 / linear4bit.model_nbytes(quantized['NF4+DQ']):.1f}x smaller)")
saved_gb_65b = 65e9 * (bits["NF4"]["computed"] - bits["NF4+DQ"]["computed"]) / 8 / 1e9
print(f"double quantization saves {bits['NF4']['computed'] - bits['NF4+DQ']['computed']:.3f} bit per weight: "
      f"{saved_gb_65b:.1f} GB for a 65B model (the paper: about 3 GB)")

# %%
# NBVAL_CHECK_OUTPUT
print("measured bits per weight equal the computed ones (within 0.01):",
      all(abs(b["measured"] - b["computed"]) < 0.01 for b in bits.values()))
print("every selected linear layer of the quantized model is 4-bit, the output head is not:",
      sum(isinstance(m, linear4bit.Linear4bit) for m in quantized["NF4+DQ"].modules()) == len(quant_layers)
      and not isinstance(quantized["NF4+DQ"].lm_head, linear4bit.Linear4bit))

# %% [markdown]
# ## Paper vs. ours

# %%
display(Markdown(f"""
| | paper (LLaMA, Pile-CC; Table 2 numbers from memory [M]) | ours (SmolLM2-135M, tinyshakespeare, {run.profile} profile, {run.device}) |
|---|---|---|
| perplexity, Int4 | 34.34 [M] | {ppl['Int4']:.2f} |
| perplexity, FP4 (E2M1) | 31.07 [M] | {ppl['FP4']:.2f} |
| perplexity, FP4 (E3M0) | 29.48 [M] | (not built) |
| perplexity, NF4 + DQ | 27.41 [M] | {ppl['NF4+DQ']:.2f} (NF4 without DQ: {ppl['NF4']:.2f}; float32: {ppl['float32']:.2f}) |
| order of the types (best first) | NF4 < FP4 < Int4 (by perplexity) | weight MSE: {' < '.join(sorted(mse, key=mse.get))}; perplexity: {' < '.join(sorted(types, key=ppl.get))} ({len(quant_layers)} of {len(linear_names)} layers quantized, {text_blocks.numel():,d} tokens) |
| bits per weight, blocks of 64 | 4.5 without DQ, 4.127 with | {bits['NF4']['measured']:.3f} and {bits['NF4+DQ']['measured']:.3f} (measured) |
| NF4 table | quantiles of N(0, 1), exact zero | equal to bitsandbytes' bit for bit: {torch.equal(nf4.nf4_code(), bnb_nf4)} |
| our quantization = bitsandbytes' | | bytes, constants and dequantized weights identical: {bit_exact} |
"""))

# %% [markdown]
# The paper's perplexities come from LLaMA models of 7B and more, evaluated on far more text, where
# NF4 + DQ stays close to 16-bit; a 135M model has less redundancy, so every 4-bit type costs it
# more. What carries over cleanly is the format: our NF4 is bitsandbytes' to the bit, it has the
# lowest weight error of the 4-bit types on SmolLM2's real weights, double quantization costs almost
# no accuracy, and the stored model takes 4.127 bits per weight, as computed. The perplexity order
# is read from the table above; with a few thousand tokens, differences of a few percent between
# the types are within the noise of the text sample, so we make no claim about that order.
#
# ## Exercises
#
# 1. Build the symmetric variant of the paper's Eq. 4 (16 levels from $Q_X(i/17)$, no exact zero)
#    and compare its weight MSE and perplexity with NF4.
# 2. Change the block size (32, 128, 256): how do bits per weight and perplexity trade off?
# 3. Build FP4 E3M0 (1 sign, 3 exponent bits) as a code book and quantize with it
#    (`nf4._nearest_index`); does it beat E2M1 as in the paper?
# 4. Which layers suffer most? Compute the relative error per layer type (q, k, v, o, gate, up,
#    down) and quantize only the worst ones in 8 bits.

# %%
claims = {
    "nf4_table_equals_bitsandbytes": torch.equal(nf4.nf4_code(), bnb_nf4),
    "quantize_dequantize_bit_exact_with_bitsandbytes_on_smollm2": bit_exact,
    "nf4_weight_error_below_int4_and_fp4": mse["NF4"] < mse["Int4"] and mse["NF4"] < mse["FP4"],
    "double_quant_changes_relative_error_by_under_1_percent": abs(rel["NF4+DQ"] / rel["NF4"] - 1) < 0.01,
    "measured_bits_per_parameter_equal_computed": all(abs(b["measured"] - b["computed"]) < 0.01 for b in bits.values()),
    "nf4_dq_perplexity_below_1_5x_float": ppl["NF4+DQ"] < 1.5 * ppl["float32"],
}
run.save(
    metrics={"mse": mse, "relative_error": rel, "perplexity": ppl, "bits_per_parameter": bits,
             "n_layers_quantized": len(quant_layers), "n_layers_exact": len(exact_layers),
             "perplexity_tokens": text_blocks.numel()},
    claims=claims,
)
