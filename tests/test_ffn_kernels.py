"""Input-sparse FFN kernels: compiled CPU and PyTorch paths equal the masked dense product, and
a batch's rows equal the same rows run alone."""
from __future__ import annotations

import pytest
import torch

from sparsekv.ffn import kernels
from sparsekv.ffn.kernels import cpu_sparse, reference

PATHS = [reference.sparse_matvec_torch, kernels.sparse_matvec]


def _case(b: int, k: int, n: int, seed: int = 0, scaled: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=g)
    x[:, ::7] = 0.0  # exact zeros never count as active
    scale = torch.rand(k, generator=g) + 0.5 if scaled else None
    thr = torch.rand(k, generator=g) * 1.2  # per-channel thresholds, about half the inputs drop
    return x, scale, thr, torch.randn(k, n, generator=g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,k,n,scaled", [(1, 64, 96, True), (2, 576, 200, False), (5, 130, 1536, True)])
def test_sparse_matvec_equals_masked_dense(path, b, k, n, scaled):
    x, scale, thr, wt = _case(b, k, n, scaled=scaled)
    want = reference.masked_dense(x, scale, thr, wt)
    torch.testing.assert_close(path(x, scale, thr, wt), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_batch_rows_equal_single_rows(path):
    x, scale, thr, wt = _case(2, 200, 300, seed=3)
    both = path(x, scale, thr, wt)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], path(x[i:i + 1], scale, thr, wt), rtol=1e-6, atol=1e-5)


def test_all_inputs_dropped_and_none_dropped():
    x, _, _, wt = _case(3, 50, 70)
    none = torch.full((50,), float("inf"))
    assert torch.equal(kernels.sparse_matvec(x, None, none, wt), torch.zeros(3, 70))
    torch.testing.assert_close(kernels.sparse_matvec(x, None, torch.zeros(50), wt), x @ wt, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,topk", [(1, 20), (3, 57), (2, 130)])
def test_topk_keeps_each_rows_top_scores(path, b, topk):
    """WINA's rule: each row keeps its own top-k by |x|·scale (the threshold is not used)."""
    x, scale, thr, wt = _case(b, 130, 80, seed=5)
    want = reference.masked_dense(x, scale, thr, wt, topk)
    assert int(reference.active_mask(x, scale, thr, topk).sum()) == b * topk
    torch.testing.assert_close(path(x, scale, thr, wt, topk), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("topk", [0, 40])
def test_masked_input_zeroes_dropped_inputs(topk):
    x, scale, thr, _ = _case(4, 130, 1, seed=7)
    want = x * reference.active_mask(x, scale, thr, topk)
    assert torch.equal(kernels.masked_input(x, scale, thr, topk), want)
    assert torch.equal(kernels.masked_input(x, None, thr, topk), x * reference.active_mask(x, None, thr, topk))


@pytest.mark.parametrize("b,i,h,n", [(1, 96, 64, 80), (3, 200, 48, 33)])
def test_gated_sparse_down_equals_masked_mlp(b, i, h, n):
    """CHESS's tail: the masked activation times up, through down, reading active channels only."""
    g = torch.Generator().manual_seed(2)
    x, act = torch.randn(b, h, generator=g), torch.randn(b, i, generator=g)
    w_up, wt_down, thr = torch.randn(i, h, generator=g), torch.randn(i, n, generator=g), torch.rand(i, generator=g)
    want = (act * (act.abs() > thr) * (x @ w_up.t())) @ wt_down
    for path in (kernels.gated_sparse_down, reference.gated_sparse_down_torch):
        torch.testing.assert_close(path(x, act, w_up, thr, wt_down), want, rtol=1e-5, atol=1e-4)
    one = kernels.gated_sparse_down(x[:1], act[:1], w_up, thr, wt_down)
    torch.testing.assert_close(one, kernels.gated_sparse_down(x, act, w_up, thr, wt_down)[:1], rtol=1e-6, atol=1e-5)


def test_compiled_kernel_is_used_on_cpu_float32():
    x, scale, thr, wt = _case(1, 32, 32)
    assert cpu_sparse.supports(x, wt)  # the build works here, so the timing path is the compiled one
    assert not cpu_sparse.supports(x.bfloat16(), wt.bfloat16())  # other dtypes keep the PyTorch path
