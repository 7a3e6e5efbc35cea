"""Triton input-sparse GEMV (CUDA): split-K over the input channels, rows of inactive channels
never loaded (masked loads), partials in a float32 workspace summed after (deterministic,
and no half-precision atomics). One program per (output tile, K split, batch row): each
row applies its own mask, so a batch costs what its rows' masks cost."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K, BLOCK_N = 32, 128


@triton.jit
def _sparse_matvec_kernel(x_ptr, scale_ptr, thr_ptr, wt_ptr, part_ptr, B, K, N, k_per_split,
                          HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_end
        xv = tl.load(x_ptr + b * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
        score = tl.abs(xv)
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + offs_k, mask=kmask, other=1.0)
        active = kmask & (score > tl.load(thr_ptr + offs_k, mask=kmask, other=0.0))
        w = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :], mask=active[:, None] & nmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(active, xv, 0.0)[:, None] * w, axis=0)
    tl.store(part_ptr + (split * B + b) * N + offs_n, acc, mask=nmask)


def sparse_matvec_triton(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor,
                         splits: int | None = None) -> torch.Tensor:
    """(x ⊙ [|x| * scale > thr]) @ wt for x [B, K], wt [K, N] (contiguous), in x's dtype."""
    x, wt = x.contiguous(), wt.contiguous()
    B, K = x.shape
    N = wt.shape[1]
    splits = splits or max(1, min(triton.cdiv(K, BLOCK_K), 32))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty(splits, B, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, BLOCK_N), splits, B)
    _sparse_matvec_kernel[grid](x, scale if scale is not None else thr, thr, wt, part, B, K, N, k_per_split,
                                HAS_SCALE=scale is not None, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return part.sum(0).to(x.dtype)
