"""The fused CPU layer ops equal their PyTorch compositions (which run where they cannot)."""
import pytest
import torch

from sparsekv.attention.kernels import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="the CPU kernels do not build here")
TOL = {torch.float32: 2e-6, torch.bfloat16: 0.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])
@torch.inference_mode()
def test_rms_norm_with_and_without_residual(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, w, r = (torch.randn(s, generator=g).to(dtype) for s in ((rows, 576), (576,), (rows, 576)))
    assert torch.allclose(cpu_ops.rms_norm(x, w, 1e-5).float(), cpu_ops.rms_norm_torch(x, w, 1e-5).float(),
                          atol=TOL[dtype] * 10, rtol=TOL[dtype])
    fused_res, ref_res = r.clone(), r.clone()
    out = cpu_ops.rms_norm(x, w, 1e-5, fused_res)
    ref = cpu_ops.rms_norm_torch(x, w, 1e-5, ref_res)
    assert torch.equal(fused_res, ref_res)  # the residual stream is exact
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_rope_in_place_on_a_fused_qkv_view(dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (9 + 6) * 64, generator=g).to(dtype)
    cos, sin = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    q, k = qkv[:, :576].view(5, 9, 64), qkv[:, 576:768].view(5, 3, 64)
    want_q, want_k, v_before = cpu_ops.rope_torch(q, cos, sin), cpu_ops.rope_torch(k, cos, sin), qkv[:, 768:].clone()
    assert cpu_ops.rope_(q, cos, sin) is q
    cpu_ops.rope_(k, cos, sin)
    assert torch.allclose(q.float(), want_q.float(), atol=TOL[dtype] * 10)
    assert torch.allclose(k.float(), want_k.float(), atol=TOL[dtype] * 10)
    assert torch.equal(qkv[:, 768:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_silu_mul(dtype):
    x = torch.randn(3, 2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert torch.allclose(cpu_ops.silu_mul(x).float(), want.float(), atol=TOL[dtype] * 10, rtol=TOL[dtype])


def test_autograd_keeps_the_torch_path():
    x = torch.randn(2, 8, requires_grad=True)
    cpu_ops.rms_norm(x, torch.ones(8), 1e-5).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k", [(49, 576), (3, 40), (17, 1536)])
@torch.inference_mode()
def test_small_gemm_equals_linear(dtype, rows, n, k):
    """Every tile shape, ragged rows/columns (clamped tiles) and a K with a scalar tail."""
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    for bias in (None, b):
        want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = cpu_ops.ops().small_gemm(x, w, bias)
        assert got.dtype == dtype and got.shape == (rows, n)
        tol = 1e-4 * k**0.5 if dtype == torch.float32 else 0.02 * k**0.5
        assert torch.allclose(got.double(), want, atol=tol, rtol=1e-2)


@torch.inference_mode()
def test_linear_routes_small_rows_to_the_kernel_and_takes_strided_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(20, 128, generator=g)[:, :96]  # row stride 128: a view of a wider tensor
    for rows in (1, 16, 20):
        assert torch.allclose(cpu_ops.linear(x[:rows], w), x[:rows] @ w.T, atol=1e-4)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        cpu_ops.ops().small_gemm(x, w, None)
