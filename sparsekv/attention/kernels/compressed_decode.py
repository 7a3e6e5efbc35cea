"""Triton decode attention over Mustafar-compressed pages (values + uint8 channel indices).

One program per (sequence, KV head, split of the compressed tokens): flash-decoding split-K. It
loads a tile of BLOCK_N compressed records, decompresses them in registers (a one-hot compare of
each kept index against the channel axis) into a dense [BLOCK_N, D] tile once per KV head, and
serves the G query heads of its GQA group from it with tl.dot, under an online softmax. Each
split writes its normalised output and log-sum-exp, which the backend merges with the dense
local window's (computed by the paged-decode kernel). Operands are fp32 before tl.dot, as
in the other kernels (the interpreter mishandles 16-bit dots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekv.attention.kernels.decode import online_softmax_step, store_split

_TARGET_PROGRAMS = 256  # enough programs to fill a GPU at batch 1
BLOCK_N = 16  # records per tile: the one-hot temporary is BLOCK_N x keep x D


@triton.jit
def _decompress(VAL, IDX, base, j, d, emask):
    """Dense [BLOCK_N, BLOCK_D] fp32 tile from records at `base` (element offsets)."""
    idx = tl.load(IDX + base[:, None] + j[None, :], mask=emask, other=0).to(tl.int32)
    val = tl.load(VAL + base[:, None] + j[None, :], mask=emask, other=0.0).to(tl.float32)
    hit = idx[:, :, None] == d[None, None, :]
    return tl.sum(tl.where(hit, val[:, :, None], 0.0), 1)


@triton.jit
def _compressed_decode_kernel(
        Q, KC, KI, VC, VI, BT, NC, QROW, O, LSE,
        sq_s, sq_h, sk_p, sk_h, sk_t, sv_p, sv_h, sv_t, sbt, so_s, so_h, so_x, sl_s, sl_h,
        per_split, scale,
        G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, K_KEEP: tl.constexpr, V_KEEP: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_VK: tl.constexpr,
        BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    sid, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nc = tl.load(NC + sid)
    qrow = tl.load(QROW + sid)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    jk = tl.arange(0, BLOCK_KK)
    jv = tl.arange(0, BLOCK_VK)
    gmask = g < G
    dmask = d < D
    q = tl.load(Q + qrow * sq_s + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * per_split
    end = tl.minimum(nc, start + per_split)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        phys = tl.load(BT + sid * sbt + t // PS, mask=tmask, other=0).to(tl.int64)
        kbase = phys * sk_p + h * sk_h + (t % PS) * sk_t
        kd = _decompress(KC, KI, kbase, jk, d, tmask[:, None] & (jk[None, :] < K_KEEP))
        s = tl.dot(q, tl.trans(kd), input_precision=PREC) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i)
        vbase = phys * sv_p + h * sv_h + (t % PS) * sv_t
        vd = _decompress(VC, VI, vbase, jv, d, tmask[:, None] & (jv[None, :] < V_KEEP))
        acc = acc * alpha[:, None] + tl.dot(p, vd, input_precision=PREC)
        m_i = m_new
    store_split(O, LSE, acc, m_i, l_i, sid * so_s + split * so_x, sid * sl_s + split, h * G + g, so_h, sl_h,
                d, gmask, dmask)


def compressed_decode(q: torch.Tensor, kc: torch.Tensor, ki: torch.Tensor, vc: torch.Tensor, vi: torch.Tensor,
                      block_table: torch.Tensor, num_compressed: torch.Tensor, query_start: torch.Tensor,
                      scale: float, max_compressed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split partials of one query per sequence over its first num_compressed[i] tokens.

    q [rows, Hq, D]; kc/vc [num_pages, Hkv, ps, keep] values and ki/vi uint8 indices (any page
    and head strides, records contiguous); block_table int32 [n, max_pages]; num_compressed,
    query_start int32 [n]. Returns fp32 out [n, Hq, S, D] and lse [n, Hq, S] (-inf: empty split).
    """
    n, (_, hq, d) = block_table.shape[0], q.shape
    _, hkv, ps, k_keep = kc.shape
    v_keep = vc.shape[3]
    want = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n * hkv), triton.cdiv(max(max_compressed, 1), BLOCK_N)))
    per_split = triton.cdiv(triton.cdiv(max(max_compressed, 1), want), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max(max_compressed, 1), per_split)
    o = torch.zeros(n, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, hq, splits, dtype=torch.float32, device=q.device)
    _compressed_decode_kernel[(n, hkv, splits)](
        q, kc, ki, vc, vi, block_table, num_compressed, query_start, o, lse,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1),
        vc.stride(2), block_table.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        per_split, scale, G=hq // hkv, D=d, PS=ps, K_KEEP=k_keep, V_KEEP=v_keep,
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_KK=triton.next_power_of_2(k_keep), BLOCK_VK=triton.next_power_of_2(v_keep), BLOCK_N=BLOCK_N,
        PREC="ieee" if q.dtype == torch.float32 else "tf32")
    return o, lse

