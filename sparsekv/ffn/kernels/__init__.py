"""Input-sparse products for the activation-sparse FFN, one implementation per device.

`sparse_matvec(x, scale, thr, wt)` = (x ⊙ [|x| * scale > thr]) @ wt, reading only the rows of
wt ([in, out]: an input channel's weights contiguous) that some row of x needs; `gather_dot`
is the output-sparse product (listed rows of M only). CPU float32 uses the compiled kernel
where it builds, CUDA the Triton kernel; everything else the PyTorch path (the reference).
"""
from __future__ import annotations

import torch

from sparsekv.ffn.kernels import cpu_sparse, reference


def sparse_matvec(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cuda":
        from sparsekv.ffn.kernels.triton_sparse import sparse_matvec_triton

        return sparse_matvec_triton(x, scale, thr, wt)
    if cpu_sparse.supports(x, wt):
        return cpu_sparse.sparse_matvec_cpu(x, scale, thr, wt)
    return reference.sparse_matvec_torch(x, scale, thr, wt)


def gather_dot(x: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if cpu_sparse.supports(x, m):
        return cpu_sparse.gather_dot_cpu(x, m, idx)
    return reference.gather_dot_torch(x, m, idx)
