"""Triton decode attention over Mustafar-compressed pages (values + a channel bitmap per token).

One program per (sequence, KV head, split of the compressed tokens): flash-decoding split-K. It
loads a tile of BLOCK_N compressed records, decompresses them in registers (each channel tests
its bit; a kept channel's value sits at the popcount of the lower bits, a cumsum over the D
bits) into a dense [BLOCK_N, D] tile once per KV head, and
serves the G query heads of its GQA group from it with tl.dot, under an online softmax. Each
split writes its normalised output and log-sum-exp, which the backend merges with the dense
local window's (computed by the paged-decode kernel). With page lists (Quest's selection per KV
head) a program walks its head's listed logical pages instead of every compressed one. Operands are fp32 before tl.dot, as
in the other kernels (the interpreter mishandles 16-bit dots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekv.attention.kernels.decode import online_softmax_step, store_split

_TARGET_PROGRAMS = 256  # enough programs to fill a GPU at batch 1
BLOCK_N = 16  # records per tile (tl.dot's least): the decode temporaries are BLOCK_N x D


@triton.jit
def _decompress(VAL, BITS, vbase, bbase, d, emask):
    """Dense [BLOCK_N, BLOCK_D] fp32 tile of the records whose values start at vbase and bitmaps
    at bbase (element offsets), emask [BLOCK_N, BLOCK_D] the real tokens and channels."""
    byte = tl.load(BITS + bbase[:, None] + (d // 8)[None, :], mask=emask, other=0).to(tl.int32)
    bit = (byte >> (d % 8)[None, :]) & 1
    pos = tl.cumsum(bit, 1) - bit  # kept channels below each channel
    return tl.load(VAL + vbase[:, None] + pos, mask=bit != 0, other=0.0).to(tl.float32)


@triton.jit
def _compressed_decode_kernel(
        Q, KC, KB, VC, VB, BT, NC, QROW, PL, O, LSE,
        sq_s, sq_h, spl_s, spl_h, spl_n, list_len, sk_p, sk_h, sk_t, skb_p, skb_h, skb_t, sv_p, sv_h, sv_t, svb_p, svb_h, svb_t,
        sbt, so_s, so_h, so_x, sl_s, sl_h, per_split, scale,
        G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_LIST: tl.constexpr):
    sid, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nc = tl.load(NC + sid)
    qrow = tl.load(QROW + sid)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + qrow * sq_s + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * per_split
    end = tl.minimum(list_len * PS if HAS_LIST else nc, start + per_split)
    for j0 in range(start, end, BLOCK_N):  # j: the token's index in the (listed or whole) page run
        j = j0 + tl.arange(0, BLOCK_N)
        if HAS_LIST:
            lp = tl.load(PL + sid * spl_s + h * spl_h + (j // PS) * spl_n, mask=j < end, other=-1)
            t = lp * PS + j % PS
            tmask = (j < end) & (lp >= 0) & (t < nc)
        else:
            t = j
            tmask = j < end
        phys = tl.load(BT + sid * sbt + t // PS, mask=tmask, other=0).to(tl.int64)
        emask = tmask[:, None] & dmask[None, :]
        kd = _decompress(KC, KB, phys * sk_p + h * sk_h + (t % PS) * sk_t,
                         phys * skb_p + h * skb_h + (t % PS) * skb_t, d, emask)
        s = tl.dot(q, tl.trans(kd), input_precision=PREC) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i)
        vd = _decompress(VC, VB, phys * sv_p + h * sv_h + (t % PS) * sv_t,
                         phys * svb_p + h * svb_h + (t % PS) * svb_t, d, emask)
        acc = acc * alpha[:, None] + tl.dot(p, vd, input_precision=PREC)
        m_i = m_new
    store_split(O, LSE, acc, m_i, l_i, sid * so_s + split * so_x, sid * sl_s + split, h * G + g, so_h, sl_h,
                d, gmask, dmask)


def compressed_decode(q: torch.Tensor, kc: torch.Tensor, kb: torch.Tensor, vc: torch.Tensor, vb: torch.Tensor,
                      block_table: torch.Tensor, num_compressed: torch.Tensor, query_start: torch.Tensor,
                      scale: float, max_compressed: int,
                      page_lists: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split partials of one query per sequence over its first num_compressed[i] tokens.

    q [rows, Hq, D]; kc/vc [num_pages, Hkv, ps, keep] values and kb/vb uint8 [num_pages, Hkv,
    ps, D // 8] channel bitmaps (any page and head strides, records contiguous); block_table
    int32 [n, max_pages]; num_compressed, query_start int32 [n]; page_lists int32 [n, Hkv, L] of
    logical compressed pages, -1 padded (any strides, e.g. expanded over Hkv), or None for all.
    Returns fp32 out [n, Hq, S, D] and lse [n, Hq, S] (-inf: empty split).
    """
    n, (_, hq, d) = block_table.shape[0], q.shape
    hkv, ps = kc.shape[1], kc.shape[2]
    if page_lists is not None:
        max_compressed = min(max_compressed, page_lists.shape[2] * ps)
        pl = page_lists.to(torch.int32)
        pl_strides = pl.stride()
    else:
        pl, pl_strides = num_compressed, (0, 0, 0)  # unread: HAS_LIST is off
    want = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n * hkv), triton.cdiv(max(max_compressed, 1), BLOCK_N)))
    per_split = triton.cdiv(triton.cdiv(max(max_compressed, 1), want), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max(max_compressed, 1), per_split)
    o = torch.zeros(n, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, hq, splits, dtype=torch.float32, device=q.device)
    _compressed_decode_kernel[(n, hkv, splits)](
        q, kc, kb, vc, vb, block_table, num_compressed, query_start, pl, o, lse,
        q.stride(0), q.stride(1), *pl_strides, 0 if page_lists is None else page_lists.shape[2], *kc.stride()[:3], *kb.stride()[:3], *vc.stride()[:3], *vb.stride()[:3],
        block_table.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        per_split, scale, G=hq // hkv, D=d, PS=ps,
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_N=BLOCK_N, PREC="ieee" if q.dtype == torch.float32 else "tf32", HAS_LIST=page_lists is not None)
    return o, lse
