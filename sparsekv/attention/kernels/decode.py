"""Triton paged decode: one query token per sequence over a list of pages, split-K.

One program serves one (sequence, KV head, split): the GQA group's query heads share every K/V
load, the page list (or all pages) is cut into splits so long contexts fill the GPU, and a
log-sum-exp reduction merges the splits. `page_lists` [num_seqs, Hkv, n] holds logical page ids
padded with -1: per KV head (Quest) or one list expanded over the heads (stride 0, DELTA). A
token is read only if its page is listed and its position `page * page_size + offset` is
inside the context, so partial pages and padding need no special case. Optional `row_lens`
[num_seqs, Hkv] (eviction with per-layer or per-head budgets) let each KV head read only the
last row_len positions of its context: the dense loop starts at that row's first page.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 256  # enough (seq, head, split) programs to fill the SMs of a large GPU


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One tile of flash-decoding's online softmax: the tile's weights p, the rescale alpha of
    what was accumulated, and the new running max and sum (rows of -inf stay empty)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_split(O, LSE, acc, m_i, l_i, o_base, lse_base, heads, so_h, sl_h, d, gmask, dmask):
    """A split's normalised output and log-sum-exp (-inf where it read nothing), for the merge."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + o_base + heads[:, None] * so_h + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(LSE + lse_base + heads * sl_h, lse, mask=gmask)


@triton.jit
def _decode_kernel(Q, K, V, BT, CTX, QROW, PL, RL, O, LSE,
                   sq_s, sq_h, sk_p, sk_h, sk_t, sv_p, sv_h, sv_t, sbt_s,
                   spl_s, spl_h, spl_n, so_s, so_h, so_x, slse_s, slse_h,
                   srl_s, n_list, per_split, scale,
                   G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr, ROWS: tl.constexpr,
                   PREC: tl.constexpr):
    sid, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(CTX + sid)
    if DENSE:
        count = tl.cdiv(ctx, PS)
    else:
        count = n_list
    lo = split * per_split
    hi = tl.minimum(lo + per_split, count)
    first = 0  # the row's first readable position
    if ROWS:
        first = ctx - tl.load(RL + sid * srl_s + h)
        if DENSE:
            lo = tl.maximum(lo, first // PS)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    qrow = tl.load(QROW + sid)
    q = tl.load(Q + qrow * sq_s + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    tok = tl.arange(0, BLOCK_N)
    off = tok % PS
    for start in range(lo, hi, BLOCK_N // PS):
        li = start + tok // PS  # index into the page list
        listed = li < hi
        if DENSE:
            page = li
        else:
            page = tl.load(PL + sid * spl_s + h * spl_h + li * spl_n, mask=listed, other=-1)
        valid = listed & (page >= 0) & (page * PS + off < ctx) & (page * PS + off >= first)
        phys = tl.load(BT + sid * sbt_s + page, mask=valid, other=0).to(tl.int64)
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + phys[:, None] * sk_p + h * sk_h + off[:, None] * sk_t + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(V + phys[:, None] * sv_p + h * sv_h + off[:, None] * sv_t + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    store_split(O, LSE, acc, m_i, l_i, sid * so_s + split * so_x, sid * slse_s + split, h * G + g, so_h, slse_h,
                d, gmask, dmask)


def pack_tables(group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's block tables [n, max pages], context lengths and first q rows, int32 on the
    device: packed once per step by the metadata, only sliced here."""
    return group.block_table, group.seq_lens, group.query_start


def tile_tokens(page_size: int) -> int:
    """Tokens per tile: whole pages, at least 16 (tl.dot's minimum) and 64 when pages are small."""
    if page_size & (page_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two page size, not {page_size}")
    return max(page_size, 64)


def paged_decode(q: torch.Tensor, kv, group, scale: float, page_lists: torch.Tensor | None = None,
                 return_lse: bool = False, row_lens: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for a group's requests (q_len 1 each) over their listed pages, or every page.

    q: [rows, Hq, D] (request i's query is row group.query_start[i]); kv: LayerKV; page_lists:
    [num_seqs, Hkv, n] logical page ids, -1 = none; row_lens: int32 [num_seqs, Hkv], each KV
    head's readable positions, the last of its context (BatchGroup.row_lens). Returns [rows, Hq, D] in q's dtype and, with
    return_lse, the float32 log-sum-exp of the scaled logits per (sequence, query head).
    """
    nseq, (_, hq, d) = group.num_reqs, q.shape
    _, hkv, ps, _ = kv.k.shape
    bt, ctx, qrow = pack_tables(group)
    block_n = tile_tokens(ps)
    dense = page_lists is None
    n_list = bt.shape[1] if dense else page_lists.shape[2]
    pages_per_tile = block_n // ps
    want = max(1, min(triton.cdiv(_TARGET_PROGRAMS, nseq * hkv), triton.cdiv(n_list, pages_per_tile)))
    per_split = triton.cdiv(triton.cdiv(n_list, want), pages_per_tile) * pages_per_tile
    splits = triton.cdiv(n_list, per_split)
    o = torch.empty(nseq, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(nseq, hq, splits, dtype=torch.float32, device=q.device)
    pl = bt if dense else page_lists  # a placeholder pointer in the dense case
    rl = ctx if row_lens is None else row_lens.contiguous()  # likewise without row lengths
    _decode_kernel[(nseq, hkv, splits)](
        q, kv.k, kv.v, bt, ctx, qrow, pl, rl, o, lse,
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv.k.stride(2),
        kv.v.stride(0), kv.v.stride(1), kv.v.stride(2), bt.stride(0),
        pl.stride(0), 0 if dense else pl.stride(1), pl.stride(-1), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1), rl.stride(0), n_list, per_split, scale,
        G=hq // hkv, D=d, PS=ps, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, DENSE=dense, ROWS=row_lens is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32")
    m = lse.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    w = torch.exp(lse - m)  # splits without keys weigh 0
    total = w.sum(-1, keepdim=True)
    merged = (o * w.unsqueeze(-1)).sum(2) / torch.where(total > 0, total, 1.0)  # nothing read: zeros
    out = torch.empty_like(q)
    out[qrow.long()] = merged.to(q.dtype)
    if not return_lse:
        return out
    return out, (m + torch.log(total)).squeeze(-1)
