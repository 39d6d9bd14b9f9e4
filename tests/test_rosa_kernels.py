"""The sparse Triton kernels (SpMM, SDDMM) and PyTorch's sparse kernels equal the dense references.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before any
kernel is defined; see tests/test_nf4_kernels.py for why that is enough). The interpreter is slow, so
the shapes are small, but they cover what matters to the kernels: empty rows, a full row, densities
from one entry to nearly dense, token counts and row lengths that are not multiples of the block sizes.

Tolerances: the kernels sum in float32 in another order than the dense matmul of the reference, so
``assert_close(rtol=1e-5, atol=1e-6 * max(1, max|ref|))``, as everywhere in the tests; bfloat16
inputs are held to one bf16 ulp of the float32-accumulated sum (``test_bfloat16_inputs_accumulate_in_float32``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from peft_from_scratch.reparameterized import rosa  # noqa: E402
from peft_from_scratch.kernels import sparse as sp, triton as kt  # noqa: E402
from tests.helpers import RTOL, ATOL, one_thread  # noqa: E402,F401

needs_triton = pytest.mark.skipif(not kt.triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, b.abs().max().item() if b.numel() else 1.0),
                               msg=lambda m: f"{what}: {m}")


def problem(d_out, d_in, n, density, seed, empty_rows=True, full_row=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(d_out, d_in, generator=g) < density
    if empty_rows and d_out > 2:
        mask[::3] = False                                    # every third row empty
    if full_row:
        mask[-1] = True
    crow, col = sp.csr_from_mask(mask)
    values = torch.randn(col.numel(), generator=g)
    x, grad_out = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    return [t.to(DEVICE) for t in (crow, col, values, x, grad_out)]


@needs_triton
@settings(max_examples=12, deadline=None)
@given(d_out=st.integers(1, 40), d_in=st.integers(1, 70), n=st.integers(1, 70),
       density=st.sampled_from([0.002, 0.03, 0.2, 0.6, 0.97, 1.0]), seed=st.integers(0, 2 ** 31),
       full_row=st.booleans())
def test_kernels_equal_the_dense_references(d_out, d_in, n, density, seed, full_row):
    crow, col, values, x, grad_out = problem(d_out, d_in, n, density, seed, full_row=full_row)
    shape = (d_out, d_in)
    ref = sp.spmm_reference(x, values, crow, col, shape)
    close(sp.spmm_triton(x, values, crow, col, shape, block_n=16, block_nnz=8), ref, "spmm triton")
    close(sp.spmm_torch(x, values, crow, col, shape), ref, "spmm torch")
    ref = sp.sddmm_reference(grad_out, x, crow, col)
    rows = sp.csr_row_indices(crow)
    close(sp.sddmm_triton(grad_out, x, rows, col, block_n=16, block_nnz=8, splits=2), ref, "sddmm triton")
    close(sp.sddmm_torch(grad_out, x, crow, col, shape), ref, "sddmm torch")
    crow_t, col_t, perm = sp.csr_transpose(crow, col, shape)      # grad_x = grad_out S, SpMM with S^T
    ref = grad_out @ sp.csr_to_dense(values, crow, col, shape)
    close(sp.spmm_triton(grad_out, values[perm], crow_t, col_t, (d_in, d_out), block_n=16, block_nnz=8), ref, "S^T")


@needs_triton
def test_default_blocks_with_ragged_edges():
    """Rows of 33 and 65 entries (block 32 + 1), 65 tokens (block 64 + 1), an empty S."""
    crow, col, values, x, grad_out = problem(9, 70, 65, 0.7, seed=0)
    mask = torch.zeros(9, 70, dtype=torch.bool)
    mask[1, :33] = mask[4, :65] = True
    mask[7, ::2] = True
    crow, col = (t.to(DEVICE) for t in sp.csr_from_mask(mask))
    values = torch.randn(col.numel(), device=DEVICE)
    close(sp.spmm_triton(x, values, crow, col, (9, 70)), sp.spmm_reference(x, values, crow, col, (9, 70)))
    rows = sp.csr_row_indices(crow)
    ref = sp.sddmm_reference(grad_out, x, crow, col)
    for splits in (None, 1, 3):
        close(sp.sddmm_triton(grad_out, x, rows, col, splits=splits), ref, f"splits={splits}")
    empty_crow, empty_col = (t.to(DEVICE) for t in sp.csr_from_mask(torch.zeros(9, 70, dtype=torch.bool)))
    empty = torch.zeros(0, device=DEVICE)
    assert not sp.spmm_triton(x, empty, empty_crow, empty_col, (9, 70)).any()
    assert sp.sddmm_triton(grad_out, x, empty_col, empty_col).shape == (0,)


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |t| (8 significant bits: 2^(floor(log2 |t|) - 7))."""
    return torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(t.abs().clamp(min=1e-30)))


def spmm_accumulating_in_bfloat16(x, values, crow, col, d_out, block_nnz):
    """What a kernel that keeps its running sum in bfloat16 computes: each block of ``block_nnz``
    products summed in float32 (the kernel's reduce), then added to a bfloat16 accumulator."""
    out = torch.zeros(d_out, x.shape[0], dtype=torch.bfloat16, device=x.device)
    for i in range(d_out):
        acc = out[i]
        for k0 in range(int(crow[i]), int(crow[i + 1]), block_nnz):
            k = torch.arange(k0, min(k0 + block_nnz, int(crow[i + 1])), device=x.device)
            acc = (acc.float() + (x[:, col[k].long()].float() * values[k]).sum(1)).bfloat16()
        out[i] = acc
    return out.T


@needs_triton
def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 x, float32 values, rows of ~256 entries in blocks of 8: the kernel's output is within one
    bf16 ulp of the float32-accumulated sum (only the final store rounds: to nearest on a GPU, by
    truncation in Triton's CPU interpreter, hence one ulp and not half), while a bf16 running sum,
    rounded after every block, is off by ~100 ulps here. The reference is computed both ways, and the
    bf16-accumulated one must fail the bound the kernel meets, so the bound can tell them apart."""
    g = torch.Generator().manual_seed(1)
    d_out, d_in, n, block_nnz = 8, 512, 16, 8
    mask = torch.rand(d_out, d_in, generator=g) < 0.5               # no empty row: every output nonzero
    crow, col = (t.to(DEVICE) for t in sp.csr_from_mask(mask))
    values = torch.randn(col.numel(), generator=g).to(DEVICE)
    x = torch.randn(n, d_in, generator=g).bfloat16().to(DEVICE)
    out = sp.spmm_triton(x, values, crow, col, (d_out, d_in), block_n=16, block_nnz=block_nnz)
    assert out.dtype == torch.bfloat16
    ref32 = sp.spmm_reference(x.float(), values, crow, col, (d_out, d_in))      # float32 accumulation
    ref16 = spmm_accumulating_in_bfloat16(x, values, crow, col, d_out, block_nnz)
    ulps = lambda y: ((y.float() - ref32).abs() / bf16_ulp(ref32)).max().item()
    assert ulps(out) < 1.0, f"the kernel is {ulps(out):.2f} bf16 ulps from the float32-accumulated sum"
    assert ulps(ref16) > 8.0, f"a bf16 accumulator is only {ulps(ref16):.2f} ulps off: the test cannot tell"


@needs_triton
def test_rosa_layer_trains_the_same_with_triton_and_with_pytorch():
    torch.manual_seed(0)
    layer = rosa.RoSALinear(nn.Linear(40, 24), r=2, alpha=4, d=0.1).to(DEVICE)
    layer.set_mask(_mask(24, 40, layer.k))
    with torch.no_grad():
        layer.values.normal_(std=0.1), layer.lora.B.normal_(std=0.1)
    x = torch.randn(3, 7, 40, device=DEVICE, requires_grad=True)
    upstream = torch.randn(3, 7, 24, device=DEVICE)
    results = []
    for use_triton in (True, False):
        layer.use_triton = use_triton
        for p in (x, layer.values, layer.lora.A, layer.lora.B):
            p.grad = None
        y = layer(x)
        (y * upstream).sum().backward()
        results.append([y.detach(), x.grad.clone(), layer.values.grad.clone(), layer.lora.A.grad.clone()])
    for what, a, b in zip(["y", "grad x", "grad values", "grad A"], *results):
        close(a, b, what)


def _mask(d_out, d_in, k, seed=0):
    idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[idx] = True
    return mask.view(d_out, d_in)


def test_the_environment_variable_selects_triton(monkeypatch):
    layer = rosa.RoSALinear(nn.Linear(8, 8), r=0, alpha=1, d=0.5)
    x = torch.randn(2, 8)
    monkeypatch.delenv(rosa.TRITON_ENV, raising=False)
    assert layer._triton(x) == (x.is_cuda and kt.triton_available())
    monkeypatch.setenv(rosa.TRITON_ENV, "1")
    assert layer._triton(x)
    layer.use_triton = False                             # an explicit choice wins
    assert not layer._triton(x)


def test_a_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kt, "triton_available", lambda: False)   # the one check both kernels share
    crow, col, values, x, _ = problem(4, 4, 2, 0.5, seed=0)
    with pytest.raises(ImportError, match="pip install triton"):
        sp.spmm_triton(x, values, crow, col, (4, 4))


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    crow, col, values, x, _ = problem(4, 4, 2, 0.5, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sp.spmm_triton(x.cpu(), values.cpu(), crow.cpu(), col.cpu(), (4, 4))
