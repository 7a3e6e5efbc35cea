"""Triton input-sparse GEMV under the interpreter (float32, small shapes) against the PyTorch path.
The interpreter must be chosen before triton is imported."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sparsekv.ffn.kernels import reference  # noqa: E402
from sparsekv.ffn.kernels.triton_sparse import sparse_matvec_triton  # noqa: E402


@pytest.mark.parametrize("b,k,n,scaled,splits", [(1, 64, 130, True, None), (2, 100, 64, False, 3), (3, 40, 256, True, 1)])
def test_triton_sparse_matvec_matches_pytorch(b, k, n, scaled, splits):
    g = torch.Generator().manual_seed(b * k)
    x = torch.randn(b, k, generator=g)
    scale = torch.rand(k, generator=g) + 0.5 if scaled else None
    thr = torch.rand(k, generator=g)
    wt = torch.randn(k, n, generator=g)
    got = sparse_matvec_triton(x, scale, thr, wt, splits=splits)
    torch.testing.assert_close(got, reference.sparse_matvec_torch(x, scale, thr, wt), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[:1], sparse_matvec_triton(x[:1], scale, thr, wt, splits=splits), rtol=1e-6, atol=1e-5)
