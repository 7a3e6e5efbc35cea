"""Input-sparse products for the activation-sparse FFN, one implementation per device.

`sparse_matvec(x, scale, thr, wt, topk)` = (x ⊙ mask) @ wt, mask = [|x| * scale > thr] or each
row's top-k scores, reading only the rows of wt ([in, out]: an input channel's weights
contiguous) that some row of x needs; `masked_input` is x ⊙ mask; `gated_sparse_down` is CHESS's MLP tail (up computed
only on the active channels, down reading only their rows). CPU float32 uses the compiled
kernels where they build, CUDA the Triton kernel; everything else the PyTorch path (the reference).
"""
from __future__ import annotations

import torch

from sparsekv.ffn.kernels import cpu_sparse, reference


def sparse_matvec(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor,
                  topk: int = 0) -> torch.Tensor:
    if cpu_sparse.supports(x, wt):
        return cpu_sparse.sparse_matvec_cpu(x, scale, thr, wt, topk)
    if x.device.type == "cuda":
        from sparsekv.ffn.kernels.triton_sparse import sparse_matvec_triton

        if topk:  # the mask first; the kernel's threshold 0 then keeps exactly its (nonzero) inputs
            x, scale, thr = x * reference.active_mask(x, scale, thr, topk), None, torch.zeros_like(thr)
        return sparse_matvec_triton(x, scale, thr, wt)
    return reference.sparse_matvec_torch(x, scale, thr, wt, topk)


def masked_input(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """x with the inputs the rule drops zeroed (the dense GEMM's input for larger batches)."""
    if cpu_sparse.supports(x, thr):
        return cpu_sparse.masked_input_cpu(x, scale, thr, topk)
    return x * reference.active_mask(x, scale, thr, topk)


def gated_sparse_down(x: torch.Tensor, act: torch.Tensor, w_up: torch.Tensor, thr: torch.Tensor,
                      wt_down: torch.Tensor) -> torch.Tensor:
    if cpu_sparse.supports(x, wt_down):
        return cpu_sparse.gated_sparse_down_cpu(x, act, w_up, thr, wt_down)
    return reference.gated_sparse_down_torch(x, act, w_up, thr, wt_down)
