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
# # 04 · NF4 and double quantization: solutions to the exercises
#
# Every answer quantizes SmolLM2's real weights. To try a code book the library does not have, we
# "fake-quantize": each weight is replaced by the value it would dequantize to (code[q] · absmax),
# which is what a 4-bit layer computes with. The first cell checks that this equals the library's
# quantize-then-dequantize for NF4, bit for bit. The smoke profile uses the first two decoder blocks
# and a few hundred tokens; the other profiles all 30 blocks.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import copy
import math

import torch
import torch.nn.functional as F

from peft_from_scratch import core, data, evaluate, models   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.quantized import nf4

run = start("04_nf4_double_quant_solutions", profile, seed, results_dir)
smol, tok = models.load_model(models.SMOLLM2)
smol.eval()
blocks_used = run.pick(smoke=2, cpu=30, gpu=30)
layers = [n for n in core.find_targets(smol, "all-linear") if int(n.split(".")[2]) < blocks_used]
text = data.lm_chunks(data.load_text("tinyshakespeare"), tok, block_size=run.pick(smoke=64, cpu=256, gpu=256),
                      n_blocks=run.pick(smoke=4, cpu=16, gpu=64))


def fake_quant(W, code, blocksize=64):
    """W -> code[q] · c_b, q the nearest code index of W / c_b per block (ties to the lower value)."""
    sorted_code = code.sort().values
    blocks = W.reshape(-1, blocksize)
    c = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks * (1 / c.clamp(min=1e-38))).clamp(-1, 1)          # as bitsandbytes scales a full block
    q = torch.bucketize(scaled, (sorted_code[1:] + sorted_code[:-1]) / 2)
    return (sorted_code[q] * c).reshape(W.shape)


def weight_error(code, blocksize=64):
    """Relative error ‖Ŵ − W‖ / ‖W‖ over the chosen layers."""
    err = norm = 0.0
    for n in layers:
        W = smol.get_submodule(n).weight.detach()
        err += (fake_quant(W, code, blocksize) - W).double().pow(2).sum().item()
        norm += W.double().pow(2).sum().item()
    return math.sqrt(err / norm)


def perplexity_with(code):
    model = copy.deepcopy(smol)
    with torch.no_grad():
        for n in layers:
            w = model.get_submodule(n).weight
            w.copy_(fake_quant(w, code))
    return evaluate.perplexity(model, text)


W = smol.get_submodule(layers[0]).weight.detach()
packed, state = nf4.quantize_4bit(W, "nf4", 64, double_quant=False)
run.check("fake_quant_equals_library_nf4", torch.equal(fake_quant(W, nf4.nf4_code()), nf4.dequantize_4bit(packed, state)))

# %% [markdown]
# ## 1. The symmetric code: 16 normal quantiles, no exact zero
#
# Put the 16 levels at the normal quantiles of 16 evenly spaced probabilities between 1 − offset
# and offset (the same outermost probability as NF4), scaled to [−1, 1]. It is symmetric, so it has
# no level at 0: a weight that is exactly zero (padding, a pruned weight) comes back as ± the
# smallest level times its block's absmax.

# %%
offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
sym = torch.special.ndtri(torch.linspace(1 - offset, offset, 16, dtype=torch.float64)).float()
sym = sym / sym.max()
print("symmetric levels:", " ".join(f"{v:+.3f}" for v in sym.tolist()))
errors = {"NF4": weight_error(nf4.nf4_code()), "symmetric": weight_error(sym)}
print(f"relative weight error: NF4 {errors['NF4']:.4f}, symmetric {errors['symmetric']:.4f}")
print(f"on these weights the {min(errors, key=errors.get)} code has the lower error, by "
      f"{100 * abs(errors['NF4'] / errors['symmetric'] - 1):.1f}%")
block = torch.tensor([0.0] * 63 + [0.05])                              # one block with 63 zeros
print("a block of 63 zeros and one 0.05 comes back with zeros as:",
      f"NF4 {fake_quant(block, nf4.nf4_code())[0].item():+.5f}, symmetric {fake_quant(block, sym)[0].item():+.5f}")
run.check("nf4_keeps_zero_symmetric_does_not",
          bool(fake_quant(block, nf4.nf4_code())[0] == 0) and bool(fake_quant(block, sym)[0] != 0))

# %% [markdown]
# ## 2. Block size: bits against error
#
# Smaller blocks keep more constants (more bits) and follow the weights more closely (less error).
# The measured bytes of the library's quantized tensors must match the formula at every block size.

# %%
print("blocksize | bits/weight (no DQ) | bits/weight (DQ) | relative error (NF4)")
bits_ok = True
for bs in (32, 64, 128, 256):
    p, s = nf4.quantize_4bit(W, "nf4", bs, double_quant=True)
    measured = 8 * nf4.quantized_nbytes(p, s) / W.numel()
    bits_ok &= abs(measured - nf4.bits_per_parameter(bs, double_quant=True)) < 1e-3
    print(f"{bs:9d} | {nf4.bits_per_parameter(bs, double_quant=False):19.4f} | {nf4.bits_per_parameter(bs):16.4f} | "
          f"{weight_error(nf4.nf4_code(), bs):.4f}")
run.check("measured_bits_match_the_formula_at_every_blocksize", bits_ok)

# %% [markdown]
# ## 3. FP4 E3M0 against E2M1
#
# E3M0: a sign and 3 exponent bits, no mantissa: magnitudes 0 and $2^{-6}, \dots, 2^0$ (the exponent
# bias chosen so that the largest level is 1). Compared by weight error and by perplexity, with
# bitsandbytes' E2M1 and NF4.

# %%
e3m0_mag = torch.tensor([0.0] + [2.0 ** -e for e in range(6, -1, -1)])
e3m0 = torch.cat([e3m0_mag, -e3m0_mag])
compare = {"FP4 E2M1": nf4.fp4_code(), "FP4 E3M0": e3m0, "NF4": nf4.nf4_code()}
ppl = {"float32": evaluate.perplexity(smol, text)}
for label, code in compare.items():
    ppl[label] = perplexity_with(code)
    print(f"{label:9s}: relative weight error {weight_error(code):.4f}, perplexity {ppl[label]:.2f}")
print(f"float32 perplexity {ppl['float32']:.2f} ({text.numel():,d} tokens; {len(layers)} layers quantized)")
# The paper's Table 2 has E3M0 (29.48) ahead of E2M1 (31.07): more range near zero for a normal
# distribution's bulk. With a few thousand tokens the difference may be within the text's noise.

# %% [markdown]
# ## 4. Which layers suffer most

# %%
by_type = {}
for n in layers:
    Wn = smol.get_submodule(n).weight.detach()
    blocks = Wn.reshape(-1, 64)
    e = by_type.setdefault(n.split(".")[-1], [0.0, 0.0, []])
    e[0] += (fake_quant(Wn, nf4.nf4_code()) - Wn).double().pow(2).sum().item()
    e[1] += Wn.double().pow(2).sum().item()
    e[2].append((blocks.abs().amax(dim=1) / blocks.pow(2).mean(dim=1).sqrt()).mean().item())   # absmax / rms per block
print("layer type | relative NF4 error | mean absmax / rms of a block")
for kind, (err, norm, peak) in sorted(by_type.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
    print(f"{kind:10s} | {math.sqrt(err / norm):18.4f} | {sum(peak) / len(peak):.2f}")
# A block whose largest weight stands far above the rest (a large absmax / rms) is rounded on a
# coarser grid relative to its typical weight: compare the columns, and the normal reference below.
g = torch.randn(4096, 64, generator=torch.Generator().manual_seed(seed))
print(f"normal weights, for reference: absmax / rms {(g.abs().amax(dim=1) / g.pow(2).mean(dim=1).sqrt()).mean():.2f}")

# %%
_ = run.save(metrics={"symmetric_vs_nf4": errors, "perplexity": ppl,
                      "relative_error_by_layer_type": {k: math.sqrt(e / n) for k, (e, n, _) in by_type.items()}})
