"""Triton probe for HiP's key search: the score of key ranges per unit, read from the paged pool.

One program scores BLOCK_C ranges of one unit (a query block of a head or a GQA group): the
max over the unit's M queries and the W keys from each range's start of q.k, with the ranges'
keys gathered through the block table into one tile and one tl.dot. It matches
hip_search.torch_probe; the tree and stage bookkeeping around it stays in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(Q, K, BT, UKV, S, O, M, C, sq_u, sq_m, sk_p, sk_h, sk_t, ss_u, so_u,
                  PS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    u, tile = tl.program_id(0), tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + u * sq_u + m[:, None] * sq_m + d[None, :], mask=(m < M)[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    n = tl.arange(0, BLOCK_C * W)  # the W keys of BLOCK_C ranges side by side: one dot
    ci = tile * BLOCK_C + n // W
    start = tl.load(S + u * ss_u + ci, mask=ci < C, other=-1)
    ok = start >= 0
    pos = tl.where(ok, start + n % W, 0)
    page = tl.load(BT + pos // PS, mask=ok, other=0).to(tl.int64)
    h = tl.load(UKV + u).to(tl.int64)
    k = tl.load(K + page[:, None] * sk_p + h * sk_h + (pos % PS)[:, None] * sk_t + d[None, :],
                mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    s = tl.where((m < M)[:, None], s, float("-inf"))
    best = tl.max(tl.reshape(tl.max(s, 0), [BLOCK_C, W]), 1)
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    listed = tl.load(S + u * ss_u + c, mask=c < C, other=-1) >= 0
    tl.store(O + u * so_u + c, tl.where(listed, best, float("-inf")), mask=c < C)


def paged_probe(qs: torch.Tensor, kv, block_table: torch.Tensor, unit_kv: torch.Tensor):
    """A hip_search.Probe for one sequence: qs [U, M, D] its units' queries, block_table [pages]
    (int32, on the device) its pool pages, unit_kv [U] each unit's KV head. Widths must be
    powers of two (block sizes and 1)."""
    u, mq, d = qs.shape
    qs = qs.contiguous()
    ukv = unit_kv.to(device=qs.device, dtype=torch.int32)
    block_m = max(16, triton.next_power_of_2(mq))

    def probe(starts: torch.Tensor, width: int) -> torch.Tensor:
        starts = starts.to(torch.int32).contiguous()
        c = starts.shape[1]
        out = torch.empty(u, c, dtype=torch.float32, device=qs.device)
        keys = max(width, 64 if block_m <= 64 else 32)  # keys per program: registers for [BLOCK_M, keys]
        block_c = keys // width
        _probe_kernel[(u, triton.cdiv(c, block_c))](
            qs, kv.k, block_table, ukv, starts, out, mq, c, qs.stride(0), qs.stride(1),
            kv.k.stride(0), kv.k.stride(1), kv.k.stride(2), starts.stride(0), out.stride(0),
            PS=kv.page_size, D=d, W=width, BLOCK_M=block_m, BLOCK_C=block_c,
            BLOCK_D=max(16, triton.next_power_of_2(d)), PREC="ieee" if qs.dtype == torch.float32 else "tf32")
        return out

    return probe
