"""Sparse-dense products for RoSA's sparse adapter S: SpMM forward, SDDMM backward, three ways each.

S is a d_out x d_in matrix with nnz nonzeros, stored in CSR (compressed sparse row):

    crow (d_out + 1,)   row i's entries sit at positions crow[i] : crow[i + 1]
    col  (nnz,)         the column of each entry, ascending within a row
    values (nnz,)       the entries themselves (RoSA trains only these)

A layer's sparse term is ``x @ S^T`` for x of shape (N, d_in) (N tokens). Its two products:

* **SpMM** (sparse x dense): ``out[n, i] = sum_{k in row i} values[k] * x[n, col[k]]``, (N, d_out).
  The same kernel gives the input gradient ``grad_x = grad_out @ S``: that is ``grad_out @ (S^T)^T``,
  an SpMM with the CSR of S^T (the CSC of S, see ``csr_transpose``).
* **SDDMM** (sampled dense-dense): the gradient of the values,
  ``grad_values[k] = sum_n grad_out[n, row[k]] * x[n, col[k]]``, which is the dense weight gradient
  ``grad_out^T x`` read at the nnz mask positions only, never formed as a d_out x d_in matrix.

For each product this file has

* ``*_reference``: the dense, masked computation, obviously correct and O(N d_out d_in): the
  tests compare the other two against it;
* ``*_torch``: PyTorch's own sparse CSR kernels (``torch.sparse.mm``, ``torch.sparse.sampled_addmm``),
  the CPU path of RoSA;
* ``*_triton``: a Triton kernel, the CUDA path (or the CPU under ``TRITON_INTERPRET=1``, for tests).

The Triton kernels, one program per (output row, block of tokens) for SpMM and per (block of nonzeros,
slice of tokens) for SDDMM, accumulate in float32. Tokens are the fastest-varying axis of every tile,
so the wrappers pass x and grad_out transposed (d x N, contiguous): each gathered row of x^T is a
contiguous run of tokens. SDDMM writes one partial sum per token slice and adds the slices in PyTorch,
so the result does not depend on the order programs finish (no atomics): it is deterministic.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from .triton import cdiv, require_triton

__all__ = ["CSR", "sparse_linear", "csr_from_mask", "csr_to_dense", "csr_row_indices", "csr_transpose", "check_csr",
           "spmm_reference", "sddmm_reference", "spmm_torch", "sddmm_torch", "spmm_triton", "sddmm_triton"]


# ----------------------------------------------------------------------------- CSR bookkeeping

def csr_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, col) of a boolean (d_out, d_in) mask, entries in row-major order, int32."""
    rows, cols = mask.nonzero(as_tuple=True)           # row-major, as torch.where: the order ShiRA uses
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    crow[1:] = torch.bincount(rows, minlength=mask.shape[0]).cumsum(0)
    return crow, cols.to(torch.int32)


def csr_row_indices(crow: torch.Tensor) -> torch.Tensor:
    """The row of every entry (the COO rows), (nnz,) int32."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=crow.device, dtype=torch.int32), counts)


def csr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape) -> torch.Tensor:
    """The dense (d_out, d_in) matrix S: values scattered into zeros."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense[csr_row_indices(crow).long(), col.long()] = values
    return dense


def csr_transpose(crow: torch.Tensor, col: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of S^T: ``(crow_t, col_t, perm)`` with ``values_t = values[perm]``. Computed once per mask.

    A stable sort of the entries by column keeps their rows ascending within each column.
    """
    d_in = shape[1]
    rows = csr_row_indices(crow)
    perm = torch.sort(col.long(), stable=True).indices
    crow_t = torch.zeros(d_in + 1, dtype=torch.int32, device=col.device)
    crow_t[1:] = torch.bincount(col.long(), minlength=d_in).cumsum(0)
    return crow_t, rows[perm], perm


def check_csr(crow: torch.Tensor, col: torch.Tensor, shape, what: str = "the mask") -> None:
    """Raise ValueError unless (crow, col) is a valid CSR pattern of a ``shape`` matrix: crow starts at
    0, never decreases and ends at nnz; columns are in range and strictly ascending within each row."""
    d_out, d_in = shape
    if crow.dim() != 1 or crow.numel() != d_out + 1:
        raise ValueError(f"{what}: crow_indices has shape {tuple(crow.shape)}, "
                         f"a {d_out} x {d_in} matrix needs ({d_out + 1},)")
    crow, col = crow.long(), col.long()
    if crow[0] != 0 or crow[-1] != col.numel() or (crow[1:] < crow[:-1]).any():
        raise ValueError(f"{what}: crow_indices must start at 0, never decrease and end at nnz = {col.numel()}")
    if col.numel() and (col.min() < 0 or col.max() >= d_in):
        raise ValueError(f"{what}: column indices must lie in [0, {d_in}), got {col.min().item()}..{col.max().item()}")
    rows = csr_row_indices(crow).long()
    if col.numel() > 1 and ((rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])).any():
        raise ValueError(f"{what}: column indices must be strictly ascending within each row")


def saved_csr_problems(saved: dict[str, torch.Tensor], shape, k: int, where: str) -> list[str]:
    """Why saved ``crow_indices``/``col_indices``/``values`` (those present in ``saved``) cannot be loaded
    as a CSR matrix of ``shape`` with ``k`` entries; [] if they can (or none were saved)."""
    present = set(saved)
    if present == {"values"}:
        return [f"{where}: sparse values without their mask (crow_indices, col_indices); "
                "save the whole adapter state (core.save_adapter does), not only its parameters"]
    if present and present != {"crow_indices", "col_indices", "values"}:
        return [f"{where}: the mask and the sparse values must be loaded together, got only {sorted(present)}"]
    if not present:
        return []
    crow, col, values = saved["crow_indices"], saved["col_indices"], saved["values"]
    if col.numel() != k or values.numel() != k or crow.numel() != shape[0] + 1:
        return [f"{where}: a mask with {col.numel()} entries and {crow.numel() - 1} rows does not fit this "
                f"layer's {shape[0]} x {shape[1]} weight with k={k} entries"]
    if not crow.any():                       # saved before any mask was set: S must still be zero
        return [f"{where}: sparse values without a mask"] if values.any() else []
    try:
        check_csr(crow, col, shape, what=f"{where}'s mask")
    except ValueError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------------------- references (dense, masked)

def spmm_reference(x: torch.Tensor, values, crow, col, shape) -> torch.Tensor:
    """x @ S^T with S made dense: (N, d_in) -> (N, d_out)."""
    return x @ csr_to_dense(values, crow, col, shape).T.to(x.dtype)


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, crow, col) -> torch.Tensor:
    """(grad_out^T x) at the mask positions: the full dense weight gradient, then sampled. (nnz,)."""
    return (grad_out.T @ x)[csr_row_indices(crow).long(), col.long()]


# ----------------------------------------------------------------------------- PyTorch's sparse kernels

def _csr(values, crow, col, shape) -> torch.Tensor:
    with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def spmm_torch(x: torch.Tensor, values, crow, col, shape) -> torch.Tensor:
    """x @ S^T through ``torch.sparse.mm`` (S (x^T), then transposed back). Computes in values' dtype."""
    out = torch.sparse.mm(_csr(values, crow, col, shape), x.to(values.dtype).T).T
    return out.to(x.dtype)


def sddmm_torch(grad_out: torch.Tensor, x: torch.Tensor, crow, col, shape, dtype=None) -> torch.Tensor:
    """grad_out^T x sampled at the pattern, through ``torch.sparse.sampled_addmm`` (beta = 0). (nnz,).
    Computes in ``dtype``, by default x's or float32 if that is narrower (bf16 inputs sum in float32)."""
    dtype = dtype or torch.promote_types(x.dtype, torch.float32)
    pattern = _csr(torch.zeros(col.numel(), dtype=dtype, device=x.device), crow, col, shape)
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dtype).T, x.to(dtype), beta=0.0).values()


# ----------------------------------------------------------------------------- Triton kernels

@functools.cache
def _kernels(interpret: bool):
    """Define (and cache) the jitted kernels; ``interpret`` is a key because Triton picks compiling or
    interpreting when a function is decorated (see nf4_dequant.py)."""
    import triton
    import triton.language as tl

    # Only Triton's core built-ins below: the helpers of triton.language that are themselves jitted
    # (tl.sum, tl.zeros) are fixed in compiled mode when triton was imported before TRITON_INTERPRET
    # was set (bitsandbytes imports it), and the interpreter then refuses to call them (see
    # nf4_dequant.py). So a sum is written as tl.sum itself writes it, tl.reduce with triton's own
    # add; the interpreter recognises that combine function and sums with NumPy (any other one it
    # would call element by element), and tl.zeros becomes tl.full(..., 0.0). (The interpreter runs a
    # kernel with its module's globals, not this function's locals: spell the names out in full.)

    @triton.jit
    def spmm_kernel(xt_ptr, crow_ptr, col_ptr, val_ptr, outt_ptr, N,
                    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr):
        # out^T[i, n] = sum_{k in row i} values[k] * x^T[col[k], n]; x^T is (d_in, N), out^T (d_out, N)
        i = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        start = tl.load(crow_ptr + i)
        end = tl.load(crow_ptr + i + 1)
        acc = tl.full([BLOCK_N], 0.0, tl.float32)
        for k0 in range(start, end, BLOCK_NNZ):          # an empty row skips the loop: its output is 0
            k = k0 + tl.arange(0, BLOCK_NNZ)
            k_ok = k < end
            cols = tl.load(col_ptr + k, mask=k_ok, other=0).to(tl.int64)
            vals = tl.load(val_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            xs = tl.load(xt_ptr + cols[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.reduce(xs.to(tl.float32) * vals[:, None], 0, tl.standard._sum_combine)
        tl.store(outt_ptr + i.to(tl.int64) * N + n, acc.to(outt_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def sddmm_kernel(gt_ptr, xt_ptr, row_ptr, col_ptr, part_ptr, N, nnz, n_per_split,
                     BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr):
        # part[s, k] = sum over tokens n of slice s of g^T[row[k], n] * x^T[col[k], n]
        k = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
        s = tl.program_id(1)
        k_ok = k < nnz
        rows = tl.load(row_ptr + k, mask=k_ok, other=0).to(tl.int64)
        cols = tl.load(col_ptr + k, mask=k_ok, other=0).to(tl.int64)
        acc = tl.full([BLOCK_NNZ], 0.0, tl.float32)
        first = s * n_per_split
        last = tl.minimum(first + n_per_split, N)
        for n0 in range(first, last, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = k_ok[:, None] & (n < last)[None, :]
            gs = tl.load(gt_ptr + rows[:, None] * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
            xs = tl.load(xt_ptr + cols[:, None] * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.reduce(gs * xs, 1, tl.standard._sum_combine)
        tl.store(part_ptr + s.to(tl.int64) * nnz + k, acc, mask=k_ok)

    return spmm_kernel, sddmm_kernel


def _check_triton(t: torch.Tensor) -> bool:
    return require_triton(t, "the sparse Triton kernels", "(spmm_torch, sddmm_torch)")


def spmm_triton(x: torch.Tensor, values, crow, col, shape, block_n: int = 64, block_nnz: int = 32) -> torch.Tensor:
    """x @ S^T with the Triton SpMM kernel: (N, d_in) -> (N, d_out), in x's dtype, accumulated in float32."""
    interpret = _check_triton(x)
    d_out, d_in = shape
    N = x.shape[0]
    xt = x.T.contiguous()                                           # (d_in, N): tokens contiguous
    outt = torch.empty(d_out, N, dtype=x.dtype, device=x.device)
    if N and d_out:
        spmm, _ = _kernels(interpret)
        spmm[(d_out, cdiv(N, block_n))](xt, crow, col, values, outt, N, BLOCK_N=block_n, BLOCK_NNZ=block_nnz)
    return outt.T


def sddmm_triton(grad_out: torch.Tensor, x: torch.Tensor, rows, col, block_n: int = 64, block_nnz: int = 32,
                 splits: int | None = None) -> torch.Tensor:
    """grad_out^T x at the entries (rows[k], col[k]) with the Triton SDDMM kernel: (nnz,) float32.

    ``splits`` token slices run in parallel (default: enough programs to fill a GPU, at least one
    block of tokens each); their partial sums are added here.
    """
    interpret = _check_triton(x)
    nnz, N = col.numel(), x.shape[0]
    if nnz == 0 or N == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=x.device)
    blocks = cdiv(nnz, block_nnz)
    if splits is None:
        splits = 1 if interpret else max(1, min(cdiv(N, block_n), cdiv(1024, blocks)))
    n_per_split = cdiv(cdiv(N, splits), block_n) * block_n
    splits = cdiv(N, n_per_split)
    gt, xt = grad_out.T.contiguous(), x.T.contiguous()
    part = torch.empty(splits, nnz, dtype=torch.float32, device=x.device)
    _, sddmm = _kernels(interpret)
    sddmm[(blocks, splits)](gt, xt, rows, col, part, N, nnz, n_per_split, BLOCK_N=block_n, BLOCK_NNZ=block_nnz)
    return part.sum(0)


# ----------------------------------------------------------------------------- the product with its gradients

class CSR(NamedTuple):
    """S's positions, with what the backward pass needs, computed once per mask."""
    crow: torch.Tensor      # (d_out + 1,) int32
    col: torch.Tensor       # (nnz,) int32
    row: torch.Tensor       # (nnz,) int32, the row of each entry (for SDDMM)
    crow_t: torch.Tensor    # CSR of S^T: (d_in + 1,)
    col_t: torch.Tensor     # (nnz,)
    perm: torch.Tensor      # values of S^T = values[perm]
    shape: tuple[int, int]  # (d_out, d_in)

    @classmethod
    def from_positions(cls, crow: torch.Tensor, col: torch.Tensor, shape) -> "CSR":
        crow_t, col_t, perm = csr_transpose(crow, col, shape)
        return cls(crow, col, csr_row_indices(crow), crow_t, col_t, perm, tuple(shape))


class SparseLinearFunction(torch.autograd.Function):
    """x -> x S^T for 2-D x (N, d_in); gradients for x (SpMM with S^T) and for S's values (SDDMM)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, csr: CSR, use_triton: bool) -> torch.Tensor:
        ctx.save_for_backward(x, values)
        ctx.csr, ctx.use_triton = csr, use_triton
        if use_triton:
            return spmm_triton(x, values, csr.crow, csr.col, csr.shape)
        return spmm_torch(x, values, csr.crow, csr.col, csr.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        csr, triton = ctx.csr, ctx.use_triton
        grad_out = grad_out.contiguous()
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:      # grad_x = grad_out S = grad_out (S^T)^T: SpMM with S^T's CSR
            shape_t = (csr.shape[1], csr.shape[0])
            spmm = spmm_triton if triton else spmm_torch
            grad_x = spmm(grad_out, values[csr.perm], csr.crow_t, csr.col_t, shape_t)
        if ctx.needs_input_grad[1]:      # (grad_out^T x) at the mask only: SDDMM
            if triton:
                grad_values = sddmm_triton(grad_out, x, csr.row, csr.col)
            else:
                grad_values = sddmm_torch(grad_out, x, csr.crow, csr.col, csr.shape)
            grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, csr: CSR, use_triton: bool = False) -> torch.Tensor:
    """x S^T for x (..., d_in) -> (..., d_out), differentiable in x and in S's values."""
    y = SparseLinearFunction.apply(x.reshape(-1, csr.shape[1]), values, csr, use_triton)
    return y.reshape(*x.shape[:-1], csr.shape[0])
