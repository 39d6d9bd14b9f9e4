"""NF4, double quantization and 4-bit linear layers: QLoRA's storage format, bit-exact with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) keeps the frozen base weights in 4 bits. Three ideas:

1. **Block-wise absmax quantization** (paper eq. 1-2). Flatten W row-major and cut it into blocks of
   ``blocksize`` = 64 values (the last block may be shorter). Each block b keeps one float32 constant
   c_b = absmax_b = max|W_b| (the paper writes its inverse) and 4-bit indices
   q = argmin_i |W / c_b - code[i]|, so that

       dequant(q) = code[q] * c_b.

2. **NormalFloat4** (paper eq. 4 and section 3). The 16 code values are quantiles of N(0, 1), so
   that each bin holds an equal share of normally distributed weights; one asymmetric half keeps an
   exact zero:  q_i = 1/2 (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))) in the paper, built in
   bitsandbytes (and here) from 8 positive and 7 negative normal quantiles plus 0, scaled to [-1, 1].

3. **Double quantization** (paper section 3, "Double Quantization"). The constants c_b cost 32/64 =
   0.5 bit per parameter. Quantize them again: subtract their mean (``offset``), then 8-bit block-wise
   quantization with bitsandbytes' signed *dynamic* code in blocks of ``blocksize2`` = 256, each with
   one float32 constant ``absmax2``:  8/64 + 32/(64 * 256) = 0.127 bit per parameter.

   Dequantization is then  W = code[q] * (code2[q2] * absmax2 + offset)  (doubleDequant, paper eq. 6;
   QLoRA's forward, eq. 5, multiplies the input by this W in bfloat16 and adds the LoRA branch).

Storage layout (that of bitsandbytes 0.50.2, ``bnb.functional.quantize_4bit``): two indices per byte,
the first element in the **high** nibble; an odd element count is padded with the index of 0.0;
the packed tensor has shape (ceil(n / 2), 1), uint8. Every choice that decides a bit is the one
bitsandbytes makes on CPU, and ``tests/test_nf4.py`` checks bytes, constants and dequantized values
against it. Where bitsandbytes' own backends disagree (the 8-bit rounding of the double-quantized
constants, ``dq_rounding``), both rules are here and the docstrings say which one is whose.

``linear4bit.py`` builds the 4-bit layer on this format (``Linear4bit``, ``quantize_model``,
checkpoints). The Triton kernel for the same dequantization is ``kernels.dequantize_4bit_triton``,
tested against ``dequantize_4bit`` here.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import register


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bnb.functional.quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4", "int4")
DQ_ROUNDINGS = ("lut", "nearest")
TINY = 1e-38   # bnb clamps absmax to this before dividing, so an all-zero block gives zeros, not NaN


# ----------------------------------------------------------------------------- the code books

def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat4 values, derived from normal quantiles; equal bit for bit to bitsandbytes'.

    The paper's NF4 puts the outermost quantile at ``offset`` = 1/2 ((1 - 1/(2*15)) + (1 - 1/(2*16)))
    (the mean of the symmetric choices for 15 and 16 levels), and builds an asymmetric type with an
    exact zero: 8 positive values Q(p) for p = linspace(offset, 1/2, 9) without the last, 7 negative
    values -Q(p) for p = linspace(offset, 1/2, 8) without the last, and 0; then divides by the max.

    To land on bitsandbytes' table exactly (``get_4bit_type("nf4")``, generated once with scipy by
    ``create_normal_map``) we follow its arithmetic: the offset rounded to 7 decimals (0.9677083), the
    quantile points p in float32, Q = the normal inverse CDF (``torch.special.ndtri``) in float64,
    the values rounded to float32 before the division by the max (all other orders differ in the
    last bit of some values).
    """
    offset = round(0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))), 7)          # 0.9677083
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # 8 levels > 0
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # 7 levels < 0
    values = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64),
                        -torch.special.ndtri(p_neg)]).float().sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1: 1 sign, 2 exponent, 1 mantissa bit) table, indexed by the 4-bit pattern.

    Index = sign bit * 8 + 3 value bits; bnb's value bits 000..111 stand for 0, 0.0625 (subnormal),
    8, 12, 4, 6, 2, 3 (its exponent encoding, bias 2), scaled by 1/12 to [-1, 1]. The table is not
    sorted and holds +0 and -0, so quantizing sorts it and maps back (see ``_nearest_index``).
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    values = torch.cat([magnitudes, -magnitudes])
    return values / values.abs().max()


def int4_code() -> torch.Tensor:
    """Symmetric Int4 as bitsandbytes' ``get_4bit_type("int4")``: levels -7..7 (over 7), two zeros.

    We take the symmetric -7..7 (not -8..7) so that +absmax and -absmax are both exact, as in the
    paper's Int4 baseline; one of the 16 patterns is a second zero (as in bnb's table).
    """
    levels = torch.tensor([7.0, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7])
    return levels / 7


CODES = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``), 256 values.

    Dettmers' dynamic tree quantization (arXiv 1511.04561, used by 8-bit optimizers and by QLoRA's
    second level): a sign bit, then a run of zeros whose length e picks the decade 10^-e, then the
    remaining bits as a linear fraction. Decade 10^(i-6), i = 0..6, gets 2^i values: the midpoints of
    ``linspace(0.1, 1, 2^i + 1)``, so small magnitudes are coarse in count but fine in relative terms.
    127 positive and 127 negative values, 0 and 1.0 (the largest value, so absmax is exact); sorted.
    Computed in float32 as bitsandbytes does, so the table is bit-identical.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


# ----------------------------------------------------------------------------- block-wise absmax

def _check_blocksize(blocksize, what: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{what}={blocksize!r} does not fit: it must be a power of two that bitsandbytes "
                         f"supports, one of {', '.join(map(str, BLOCKSIZES))}")


def _absmax_and_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per block and x / absmax clamped to [-1, 1], as bitsandbytes' PyTorch backend computes them.

    x: flat float32. Two details decide bits: full blocks multiply by the float32 reciprocal
    1/absmax, the short last block divides by its absmax; and that last block's stored absmax is the
    clamped one (at least 1e-38), while a full all-zero block stores 0.
    """
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = x[full:].abs().amax().clamp(min=TINY)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def _nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the code value nearest to each ``scaled`` value (uint8).

    Sort the code, cut [-1, 1] at the midpoints between neighbours and ``bucketize``: a value exactly
    on a midpoint goes to the lower neighbour (bitsandbytes' rule). The stable sort keeps +0 before
    -0 in FP4 and Int4, so the indices are those bitsandbytes stores.
    """
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    index = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    if torch.equal(sorted_code, code):          # NF4 and the dynamic code are stored in value order
        return index
    return order.to(device=index.device, dtype=torch.uint8)[index.int()]


def _lut_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' native CPU rounding (``quantize_cpu`` in csrc/cpu_ops.cpp, bnb >= 0.49), uint8.

    Round twice: first to the nearest of 65536 evenly spaced points g_k = -1 + 2k/65535, then take
    the code value nearest to g_k (a 65536-entry table). Near a midpoint between two code values this
    can pick the other neighbour than exact rounding (about 0.2% of values for the dynamic code).
    All arithmetic in float32, in the library's order.
    """
    k = 65536
    grid = -1.0 + (2.0 * torch.arange(k, dtype=torch.float32, device=scaled.device)) / (k - 1)
    table = _nearest_index(grid, code.to(scaled.device)).long()
    # A subnormal absmax has an infinite reciprocal, so 0 * inf = NaN; the library's float -> int cast
    # turns NaN into position 0 (on x86). Same here, instead of an out-of-range index.
    scaled = torch.nan_to_num(scaled, nan=-1.0)
    lut_pos = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (k - 1) + 0.5).long()   # truncation, as the C cast
    return table[lut_pos].to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                       rounding: str = "lut") -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise absmax quantization of a flat float32 tensor: (indices uint8, absmax float32).

    The second level of double quantization. ``rounding`` picks between bitsandbytes' two CPU paths,
    which differ in more than the rounding:

    * ``"lut"``: its native library (what ``bnb.functional.quantize_blockwise`` runs on CPU when the
      compiled library loads, i.e. normally): x * (1/absmax) in every block, the two-step rounding of
      ``_lut_index``, an all-zero block stores absmax 0 and index 0.
    * ``"nearest"``: its pure-PyTorch backend: exact nearest code (ties to the lower index), the
      details of ``_absmax_and_scale``, an all-zero block maps to the index of 0.0. Its CUDA kernel
      also rounds to the nearest code (a binary search), up to exact ties.
    """
    if rounding == "nearest":
        absmax, scaled = _absmax_and_scale(x, blocksize)
        return _nearest_index(scaled, code.to(x.device)), absmax
    if rounding != "lut":
        raise ValueError(f"rounding must be one of {DQ_ROUNDINGS}, got {rounding!r}")
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = F.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)   # zeros leave absmax as is
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    q = _lut_index((padded * inverse[:, None]).reshape(-1)[:n], code)
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    return q.masked_fill(zero_block, 0), absmax


def _times_block_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] *= absmax[i // blocksize], in place, for flat float32 values (a fresh gather's
    output: multiplying in place spares a second tensor of that size); the short last block separately."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[:full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """code[q] * absmax of q's block, in float32 (the same product bitsandbytes computes)."""
    return _times_block_absmax(torch.index_select(code.to(q.device), 0, q.reshape(-1).int()), absmax, blocksize)


# ----------------------------------------------------------------------------- the quantization state

@dataclass(eq=False)
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor, named as in ``bnb.functional.QuantState``.

    absmax: per-block constants c_b: float32, or uint8 indices into ``code2`` when double-quantized.
    shape, dtype: the original tensor's. blocksize: values per block. code: the 16-value code book.
    quant_type: "nf4", "fp4" or "int4". offset: mean of the float32 absmax (double quantization, 0-d).
    absmax2, code2, blocksize2: the second level (float32 constant per block of 256 constants, the
    dynamic code). dq_rounding: how the second level was rounded (``quantize_blockwise``).
    fingerprint: a short hash of the shape, layout and a sample of the packed bytes, so a state used
    with another tensor's bytes is caught (``dequantize_4bit(..., check=True)``).
    """
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int | None = None
    dq_rounding: str | None = None
    fingerprint: str = ""

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def layout(self) -> dict:
        """The JSON-ready description a checkpoint stores and compares (no tensors)."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.nested,
                "blocksize2": self.blocksize2, "dq_rounding": self.dq_rounding}

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)
        return QuantState(move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
                          self.quant_type, move(self.offset), move(self.absmax2), move(self.code2),
                          self.blocksize2, self.dq_rounding, self.fingerprint)


def packed_fingerprint(packed: torch.Tensor, shape, blocksize: int, quant_type: str) -> str:
    """sha256 of the layout and up to 64 evenly spaced packed bytes: cheap, and catches swapped states."""
    flat = packed.reshape(-1)
    sample = flat[torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long().to(flat.device)]
    h = hashlib.sha256(f"{tuple(shape)}|{blocksize}|{quant_type}|".encode())
    h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- quantize / dequantize

@register("nf4", family="quantized", kind="quantization", paper="dettmers2023qlora")
def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  blocksize2: int = 256, dq_rounding: str = "lut",
                  allow_nonfinite: bool = False) -> tuple[torch.Tensor, QuantState]:
    """Block-wise 4-bit quantization of W (any shape): (packed uint8 of shape (ceil(n/2), 1), state).

    Equals ``bnb.functional.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type,
    compress_statistics=double_quant)`` on CPU byte for byte (nf4 and fp4; int4 is ours, for
    comparison). Steps: W flattened row-major in float32; absmax per block of ``blocksize``; each value
    to its nearest code value (``_nearest_index``); pairs packed high nibble first. With
    ``double_quant``: offset = mean(absmax), then ``quantize_blockwise(absmax - offset, dynamic_code(),
    blocksize2, dq_rounding)``; ``dq_rounding="lut"`` reproduces bnb's native CPU library.

    NaN and inf. A block's absmax is then NaN or inf, and every value of the block dequantizes to NaN
    or +-inf (x / inf = 0 and 0 * inf = NaN); with double quantization the offset, mean(absmax), is
    NaN or inf too, so *every* block of the tensor comes back NaN. bitsandbytes quantizes such a
    tensor silently. We refuse it (a diverged or corrupted weight is a bug to see, not to store), with
    the count and the first position; ``allow_nonfinite=True`` quantizes it as bitsandbytes does,
    byte for byte (``tests/test_nf4.py``).

    Raises:
        TypeError: W is not a floating-point tensor.
        ValueError: W is empty, holds NaN or inf (unless ``allow_nonfinite``), or blocksize /
            blocksize2 / quant_type / dq_rounding is not supported.
    """
    if not isinstance(W, torch.Tensor) or not W.dtype.is_floating_point:
        what = W.dtype if isinstance(W, torch.Tensor) else type(W).__name__
        raise TypeError(f"4-bit quantization needs a floating-point tensor (float32, float16, bfloat16), got {what}")
    if W.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(W.shape)})")
    if not allow_nonfinite:
        check_finite(W, blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_blocksize(blocksize)
    if double_quant:
        _check_blocksize(blocksize2, "blocksize2")
        if dq_rounding not in DQ_ROUNDINGS:
            raise ValueError(f"dq_rounding must be one of {DQ_ROUNDINGS}, got {dq_rounding!r}")

    code = CODES[quant_type]().to(W.device)
    absmax, scaled = _absmax_and_scale(W.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:                        # odd count: pad with a 0.0 (bnb pads before rounding)
        scaled = F.pad(scaled, (0, 1))
    q = _nearest_index(scaled, code)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)     # first element in the high nibble

    state = QuantState(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize, code=code,
                       quant_type=quant_type)
    if double_quant:
        state.offset = absmax.mean()
        state.code2 = dynamic_code().to(W.device)
        state.absmax, state.absmax2 = quantize_blockwise(absmax - state.offset, state.code2, blocksize2,
                                                         dq_rounding)
        state.blocksize2, state.dq_rounding = blocksize2, dq_rounding
    state.fingerprint = packed_fingerprint(packed, W.shape, blocksize, quant_type)
    return packed, state


def check_finite(W: torch.Tensor, blocksize: int = 64) -> None:
    """Raise ValueError if W holds NaN or inf, naming how many, of which kind, and the first one's place."""
    bad = ~torch.isfinite(W.detach())
    if not bad.any():
        return
    flat = bad.reshape(-1)
    count, nan = int(flat.sum()), int(torch.isnan(W.detach()).sum())
    first = int(flat.nonzero()[0])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), W.shape)) if W.dim() else ()
    raise ValueError(
        f"cannot quantize a tensor with non-finite values: {count} of its {W.numel()} values "
        f"({nan} NaN, {count - nan} inf), the first at index {where} (flat {first}, block {first // blocksize} "
        f"of {blocksize} values). Its block's absmax would be NaN/inf and every value of that block (with "
        f"double quantization: of the whole tensor) would dequantize to NaN/inf. Fix the weight, or pass "
        f"allow_nonfinite=True to quantize it anyway, as bitsandbytes does")


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 **kwargs) -> tuple[torch.Tensor, QuantState]:
    """``quantize_4bit`` with ``quant_type="nf4"``: QLoRA's storage type (with double quantization)."""
    return quantize_4bit(W, "nf4", blocksize, double_quant, **kwargs)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 per-block constants: absmax, or code2[absmax] * absmax2 + offset when nested."""
    if not state.nested:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.absmax2, state.code2, state.blocksize2) + state.offset


def check_state(packed: torch.Tensor, state: QuantState, fingerprint: bool = True) -> None:
    """Raise ValueError if ``packed`` and ``state`` do not describe the same tensor."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit data must be uint8, got {packed.dtype}")
    want = (state.numel + 1) // 2
    if packed.numel() != want:
        raise ValueError(f"the packed tensor has {packed.numel()} bytes, but the state describes a tensor of "
                         f"shape {tuple(state.shape)} ({state.numel} values = {want} bytes): "
                         "is this the state of another tensor?")
    if state.absmax.numel() != state.nblocks:
        raise ValueError(f"the state has {state.absmax.numel()} block constants, a {tuple(state.shape)} tensor "
                         f"in blocks of {state.blocksize} needs {state.nblocks}")
    if state.nested:
        if state.absmax.dtype != torch.uint8:
            raise ValueError(f"a double-quantized absmax is uint8, got {state.absmax.dtype}")
        if state.absmax2.numel() != -(-state.nblocks // state.blocksize2):
            raise ValueError(f"absmax2 has {state.absmax2.numel()} values, expected "
                             f"ceil({state.nblocks} / {state.blocksize2})")
    elif state.absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (or uint8 with absmax2 for double quantization), "
                         f"got {state.absmax.dtype}")
    if fingerprint and state.fingerprint:
        got = packed_fingerprint(packed, state.shape, state.blocksize, state.quant_type)
        if got != state.fingerprint:
            raise ValueError(f"the packed bytes do not match this state (fingerprint {got} != "
                             f"{state.fingerprint}): the state was made for another tensor of shape "
                             f"{tuple(state.shape)}")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, check: bool = True) -> torch.Tensor:
    """W ≈ code[q] * c_b, shape and dtype of the original tensor (the PyTorch reference).

    The products are taken in float32 and cast at the end, as bitsandbytes does, so the result is
    bit-identical to ``bnb.functional.dequantize_4bit``, with two exceptions where bitsandbytes 0.50.2's
    AVX-512 CPU kernel is the odd one out (its PyTorch backend agrees with us; tests/test_nf4.py pins
    both): for a 2-D tensor whose last dimension is a multiple of 16 but not of ``blocksize`` it reads
    the absmax of the wrong block, and its bfloat16 output flushes subnormals to zero.
    ``check`` verifies the packed bytes against the state's fingerprint (a 64-byte gather).
    """
    check_state(packed, state, fingerprint=check)
    absmax = dequantize_absmax(state)
    # One lookup per byte: row b of `pairs` is (code[b >> 4], code[b & 15]), high nibble first. Each row
    # is read as one 8-byte word, so the gather moves one element per byte: a 1-D index_select, about
    # 5x faster on CPU than indexing the rows of a (256, 2) table, and the same bits.
    pairs = torch.stack([state.code.repeat_interleave(16), state.code.repeat(16)], dim=1).float().contiguous()
    words = torch.index_select(pairs.view(torch.int64).view(-1), 0, packed.reshape(-1).int())
    values = words.view(torch.float32)[:state.numel]
    return _times_block_absmax(values, absmax, state.blocksize).view(state.shape).to(state.dtype)


dequantize_nf4 = dequantize_4bit


# ----------------------------------------------------------------------------- memory

def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> float:
    """Storage per weight: 4 bits + the block constants (paper, section 3).

    Without double quantization one float32 per block: 4 + 32/64 = 4.5. With it one byte per block
    plus one float32 per blocksize2 blocks: 4 + 8/64 + 32/(64 * 256) = 4.127 (offset and code books,
    a few bytes per tensor, are left out).
    """
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def quantized_nbytes(packed: torch.Tensor, state: QuantState) -> int:
    """Measured bytes of a quantized tensor: packed + absmax [+ absmax2 + offset]. The shared code
    books are not counted. (``linear4bit.model_nbytes`` sums this over a model.)"""
    tensors = [packed, state.absmax, state.absmax2, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
