"""Triton page scoring for the decode-time sparse methods.

Quest: per page, the upper bound of q.k from the page's key bounds, sum_i max(q_i kmin_i,
q_i kmax_i) = q+ . kmax + q- . kmin, max over each KV group's query heads; reads only the bounds
(2 * D values per page and head). DELTA: per page, the sum over its tokens of the token's largest
softmax probability over heads, from q.k and the log-sum-exp the dense decode kernel returned.
Both write [num_seqs, H, max pages] with the reduction's identity past a sequence's pages.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekv.attention.kernels.decode import pack_tables, tile_tokens

_QUEST_PAGES = 64  # pages per Quest program (the N of its tl.dot)


@triton.jit
def _quest_kernel(Q, KMIN, KMAX, BT, CTX, QROW, OUT,
                  sq_s, sq_h, sb_p, sb_h, sbt_s, so_s, so_h,
                  G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    sid, h, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    qmask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(Q + tl.load(QROW + sid) * sq_s + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=qmask, other=0.0).to(tl.float32)
    page = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = page < tl.cdiv(tl.load(CTX + sid), PS)
    phys = tl.load(BT + sid * sbt_s + page, mask=valid, other=0).to(tl.int64)
    ptr = phys[:, None] * sb_p + h * sb_h + d[None, :]
    bmask = valid[:, None] & (d < D)[None, :]
    kmax = tl.load(KMAX + ptr, mask=bmask, other=0.0).to(tl.float32)
    kmin = tl.load(KMIN + ptr, mask=bmask, other=0.0).to(tl.float32)
    ub = tl.dot(tl.maximum(q, 0.0), tl.trans(kmax), input_precision=PREC)
    ub += tl.dot(tl.minimum(q, 0.0), tl.trans(kmin), input_precision=PREC)  # [BLOCK_G, BLOCK_P]
    best = tl.max(tl.where((g < G)[:, None], ub, float("-inf")), 0)
    tl.store(OUT + sid * so_s + h * so_h + page, tl.where(valid, best, float("-inf")))


@triton.jit
def _delta_kernel(Q, K, BT, CTX, QROW, LSE, OUT,
                  sq_s, sq_h, sk_p, sk_h, sk_t, sbt_s, slse_s, so_s, so_h, scale, hkv,
                  G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PER_GROUP: tl.constexpr, PREC: tl.constexpr):
    sid, blk = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    qrow = tl.load(QROW + sid)
    ctx = tl.load(CTX + sid)
    tok = tl.arange(0, BLOCK_P * PS)
    page_of_tok = blk * BLOCK_P + tok // PS
    valid = page_of_tok * PS + tok % PS < ctx
    phys = tl.load(BT + sid * sbt_s + page_of_tok, mask=valid, other=0).to(tl.int64)
    page = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    best = tl.zeros([BLOCK_P * PS], tl.float32)
    for h in range(0, hkv):
        heads = h * G + g
        q = tl.load(Q + qrow * sq_s + heads[:, None] * sq_h + d[None, :],
                    mask=gmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        lse = tl.load(LSE + sid * slse_s + heads, mask=gmask, other=float("inf"))
        k = tl.load(K + phys[:, None] * sk_p + h * sk_h + (tok % PS)[:, None] * sk_t + d[None, :],
                    mask=valid[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        prob = tl.where(gmask[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0)
        head_best = tl.max(prob, 0)
        if PER_GROUP:
            mass = tl.sum(tl.reshape(head_best, [BLOCK_P, PS]), 1)
            tl.store(OUT + sid * so_s + h * so_h + page, mass)
        else:
            best = tl.maximum(best, head_best)
    if not PER_GROUP:
        tl.store(OUT + sid * so_s + page, tl.sum(tl.reshape(best, [BLOCK_P, PS]), 1))


def _shapes(q: torch.Tensor, kv) -> dict:
    hq, d = q.shape[1], q.shape[2]
    g = hq // kv.k.shape[1]
    return dict(G=g, D=d, PS=kv.page_size, BLOCK_G=max(16, triton.next_power_of_2(g)),
                BLOCK_D=max(16, triton.next_power_of_2(d)), PREC="ieee" if q.dtype == torch.float32 else "tf32")


def quest_page_scores(q: torch.Tensor, kv, group) -> torch.Tensor:
    """[num_seqs, Hkv, max pages] float32 Quest bounds (-inf past a sequence's pages)."""
    bt, ctx, qrow = pack_tables(group)
    nseq, width, hkv = bt.shape[0], bt.shape[1], kv.k.shape[1]
    blocks = triton.cdiv(width, _QUEST_PAGES)
    out = torch.empty(nseq, hkv, blocks * _QUEST_PAGES, dtype=torch.float32, device=q.device)
    _quest_kernel[(nseq, hkv, blocks)](
        q, kv.kmin, kv.kmax, bt, ctx, qrow, out, q.stride(0), q.stride(1), kv.kmin.stride(0),
        kv.kmin.stride(1), bt.stride(0), out.stride(0), out.stride(1), BLOCK_P=_QUEST_PAGES, **_shapes(q, kv))
    return out[:, :, :width]


def delta_page_scores(q: torch.Tensor, kv, group, scale: float, lse: torch.Tensor, per_group: bool) -> torch.Tensor:
    """[num_seqs, Hkv or 1, max pages] float32 DELTA page mass (0 past a sequence's pages).

    lse: [num_seqs, Hq] log-sum-exp of the scaled logits, from paged_decode(return_lse=True).
    """
    bt, ctx, qrow = pack_tables(group)
    nseq, width, hkv = bt.shape[0], bt.shape[1], kv.k.shape[1]
    per_prog = tile_tokens(kv.page_size) // kv.page_size
    blocks = triton.cdiv(width, per_prog)
    out = torch.empty(nseq, hkv if per_group else 1, blocks * per_prog, dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    _delta_kernel[(nseq, blocks)](
        q, kv.k, bt, ctx, qrow, lse, out, q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1),
        kv.k.stride(2), bt.stride(0), lse.stride(0), out.stride(0), out.stride(1), scale, hkv,
        BLOCK_P=per_prog, PER_GROUP=per_group, **_shapes(q, kv))
    return out[:, :, :width]
