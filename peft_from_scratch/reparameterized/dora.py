"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv 2402.09353), a variant of LoRA.

DoRA splits a pretrained weight into a magnitude and a direction, W0 = ||W0||_c * (W0 / ||W0||_c)
(paper Eq. 2), lets LoRA move the direction and learns the magnitude as a separate vector m
(Eq. 5):

    W' = m * (W0 + s B A) / ||W0 + s B A||_c,        s = alpha / r (or alpha / sqrt(r), rsLoRA)

``||.||_c`` is the norm of each output unit's weight vector: for an ``nn.Linear`` weight of shape
[d_out, d_in] it is ``torch.linalg.norm(W, dim=1)``, one number per output row. m has d_out
entries and starts at ||W0||_c; B starts at zero, so W' = W0 at initialisation.

Section 4.3 of the paper treats ||W0 + sBA||_c as a constant in the backward pass (it is
``.detach()``-ed): the gradient then flows into B and A only through the numerator, which saves
memory and, the paper reports, costs no accuracy. peft and the official code do the same.

Forward without forming W'. Write c = m / ||W0 + sBA||_c (a d_out vector, constant for autograd):

    W' x + b = c * (W0 x + s B A x) + b                        (the bias is not rescaled)

which costs one ``W0 x`` (the base layer's own matmul, without its bias), LoRA's two thin matmuls
(the second adds s B A x into W0 x in place) and one multiply by c; autograd keeps one (..., d_out)
tensor, W0 x + sBAx, for m's gradient. peft writes the same thing as
``base(x) + (c - 1) * (W0 x) + c * s B A x`` and keeps two, W0 x and B A x; the two forms agree to
float32 rounding.

The row norm without forming W0 + sBA. Expanding the square of each row,

    ||W0 + sBA||^2_row = ||W0||^2_row + 2 s rowsum(W0 * BA) + s^2 ||BA||^2_row
                       = ||W0||^2_row + 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B)

(``*`` is the elementwise product). ||W0||^2_row is a constant, cached once; the other two terms
need the d_out x r product W0 A^T and the r x r Gram matrix A A^T, so the only d_out x d_in work is
one pass over W0 inside ``W0 @ A.T``. peft instead materialises BA (through ``B(A(eye(d_in)))``),
adds it to W0 and takes the norm of the d_out x d_in result, every step.

Rounding: the three terms are d_out vectors, summed in float64. The float32 error of the cross term
is ~eps ||W0|| ||sBA||, so the relative error of the norm grows like eps ||W0||^2 / ||W0 + sBA||^2:
as good as the direct formula (~1e-7 against a float64 reference, on SmolLM2's weights with updates
up to ||sBA|| = ||W0||) while the update does not cancel most of a row, and worse when it does
(1e-3 when a row shrinks to 1% of its norm). Rows whose squared norm fell below a quarter of
||W0||^2 are therefore recomputed directly (a check that never fires in ordinary fine-tuning; on a
GPU it costs one host sync per layer). tests/test_dora.py measures both regimes.

Dropout. With LoRA dropout active (training mode, p > 0) we follow peft and the official NVlabs
code: the dropped input x_d = dropout(x) feeds both the LoRA branch and the rescaling term,

    y = base(x) + (c - 1) * (W0 x_d) + c * s B A x_d,

so the base output W0 x is computed a second time, on x_d. The expected value over the dropout
mask is c * (W0 x + sBAx) + b, the paper's W' x + b. In eval mode (or p = 0) x_d = x and both
forms are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import register
from .lora import LoRAConfig, LoRALinear, LoRAVariant


class DoRA(LoRAVariant):
    """x -> (m / ||W0 + sBA||_c) * (W0 x + s B A x) + b, for the LoRA layer it is given.

    Holds the magnitude ``m`` (d_out,), initialised to the row norms of W0; the LoRA parameters
    (A, B, scaling, init, dropout) are the layer's ``lora`` branch.
    Raises:
        NotImplementedError: the base weight is not floating point (a quantized layer).
    """

    def __init__(self, layer: LoRALinear):
        super().__init__()
        W0 = layer.base_layer.weight
        if not W0.dtype.is_floating_point:
            raise NotImplementedError(f"DoRA needs a floating-point base weight to take its row norms; this layer "
                                      f"has a {W0.dtype} (quantized) weight. Use LoRA on a 4-bit base, or DoRA on "
                                      "the float model")
        with torch.no_grad():  # B = 0, so ||W0 + sBA||_c = ||W0||_c: W' = W0 at init
            self.m = nn.Parameter(torch.linalg.norm(W0, dim=1).to(layer.lora.A.dtype))
        self._w0_sq = None         # (key, ||W0||^2_row in float64): see _w0_row_sq
        self._merged_norm = None   # ||W0 + sBA||_c at merge time, so unmerge is exact

    # -------------------------------------------------------------- the column norm ||W0 + sBA||_c

    def _w0_row_sq(self, W0: torch.Tensor) -> torch.Tensor:
        """||W0||^2 per row in float64, computed once and reused while W0 is unchanged.

        The key holds the weight's storage, version counter, device and dtype, so loading new base
        weights (``copy_``, ``load_state_dict``) or moving the model recomputes it.
        """
        key = (W0.data_ptr(), W0._version, W0.device, W0.dtype)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, W0.detach().double().pow(2).sum(dim=1))
        return self._w0_sq[1]

    @torch.no_grad()
    def weight_norm(self, layer: LoRALinear) -> torch.Tensor:
        """||W0 + s B A||_c per output row, without forming any d_out x d_in matrix (see module doc).

        Under ``no_grad``: this is the constant of the paper's section 4.3, it receives no gradient.
        """
        if layer.merged:
            raise RuntimeError("the adapter is merged: base_layer.weight is W', not W0")
        A, B, s = layer.lora.A, layer.lora.B, layer.lora.scaling
        W0 = layer.base_layer.weight.to(A.dtype)
        w0_sq = self._w0_row_sq(layer.base_layer.weight)
        # 2s rowsum(W0 * BA) + s^2 ||BA||^2_row = rowsum(B * (2s W0 A^T + s^2 B A A^T))
        T = torch.addmm(F.linear(W0, A), B, A @ A.T, beta=2 * s, alpha=s * s)    # d_out x r
        norm_sq = w0_sq + (B * T).sum(dim=1).double()
        # Cancellation: if sBA removed most of a row (||W0 + sBA||^2 < ||W0||^2 / 4), the expansion
        # loses digits (its error grows like ||W0||^2 / ||W0 + sBA||^2); redo those rows directly.
        bad = norm_sq < w0_sq / 4
        if bad.any():                                     # rare: never at init, never on SmolLM2 tests
            rows = bad.nonzero().squeeze(1)
            norm_sq[rows] = (W0[rows] + s * (B[rows] @ A)).double().pow(2).sum(dim=1)
        return norm_sq.sqrt().to(A.dtype)

    @torch.no_grad()
    def weight_norm_direct(self, layer: LoRALinear) -> torch.Tensor:
        """The same norm as the paper writes it: ||W0 + s B A||_c from the full matrix (for checks)."""
        return torch.linalg.norm(layer.base_layer.weight.to(layer.lora.A.dtype) + layer.lora.delta(), dim=1)

    # -------------------------------------------------------------- forward

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:   # x: (..., d_in) -> (..., d_out)
        W0, bias, lora = layer.base_layer.weight, layer.base_layer.bias, layer.lora
        c = (self.m / self.weight_norm(layer)).to(x.dtype)     # m / ||W0 + sBA||_c, a constant norm
        if layer.training and isinstance(lora.dropout, nn.Dropout):   # peft's (and NVlabs') convention
            x_d = lora.dropout(x)
            return layer.base_layer(x) + (c - 1) * F.linear(x_d, W0) + c * lora.product(x_d).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])                    # (tokens, d_in): z below is a plain 2-D tensor
        z = self._add_lora_(lora, F.linear(x2, W0), x2)    # W0 x + s B A x
        y = c * z if bias is None else torch.addcmul(bias, c, z)   # W' x + b = c * (W0 x + s B A x) + b
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _add_lora_(lora, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z += s B A x for 2-D z and x, in place: the sum rides along in B's matmul (addmm with
        beta = 1), so no (tokens, d_out) temporary is made for s B A x or for the sum. Safe for
        autograd: the W0 x matmul that produced z does not keep its output for backward (and z is not
        a view, which would make autograd copy the gradient in backward)."""
        Ax = F.linear(x.to(lora.A.dtype), lora.A)
        sB = lora.B * lora.scaling                        # scale the small d_out x r matrix, not the output
        if z.dtype != Ax.dtype:                           # e.g. a bf16 base with a float32 adapter
            return (z + F.linear(Ax, sB)).to(z.dtype)    # add in float32, round once (as peft)
        return z.addmm_(Ax, sB.T)

    # -------------------------------------------------------------- merge: W <- W', and back

    def merge(self, layer: LoRALinear) -> None:
        """W <- (m / ||W0 + sBA||_c) * (W0 + sBA), keeping the norm so that unmerge is exact."""
        W = layer.base_layer.weight
        V = W.to(layer.lora.A.dtype) + layer.lora.delta()       # W0 + sBA, the paper's V + dV
        self._merged_norm = torch.linalg.norm(V, dim=1)
        W.data.copy_(((self.m / self._merged_norm)[:, None] * V).to(W.dtype))
        self._w0_sq = None

    def unmerge(self, layer: LoRALinear) -> None:
        """W0 = W' / (m / norm) - sBA, with the norm cached at merge time."""
        W = layer.base_layer.weight
        c = self.m / self._merged_norm
        W.data.copy_((W.to(layer.lora.A.dtype) / c[:, None] - layer.lora.delta()).to(W.dtype))
        self._merged_norm = None
        self._w0_sq = None

    def extra_repr(self) -> str:
        return f"magnitude m: ({self.m.shape[0]},)"


@register("dora", family="reparameterized", paper="liu2024dora", parent="lora")
@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA's hyper-parameters; each layer gets the DoRA variant (peft: ``LoraConfig(use_dora=True)``)."""
    variant: ClassVar = DoRA
    renames_v1: ClassVar = LoRAConfig.renames_v1 + ((r"\.m$", ".variant.m"),)

    @classmethod
    def examples(cls):
        return [("llama", cls(r=2, alpha=4, target_modules=["q_proj", "v_proj"])),
                ("llama", cls(r=4, alpha=8, dropout=0.1, target_modules="all-linear")),
                ("bert", cls(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))]
