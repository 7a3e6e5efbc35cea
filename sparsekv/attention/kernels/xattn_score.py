"""Triton XAttention scoring: strided antidiagonal logits, row softmax and block sums in one kernel.

One program per (query block, query head). Its B/S strided query rows meet the strided key rows
of every causal key block: each logit is a sum of S small dots between query slice t and key
slice S-1-t read straight from the paged cache, so nothing is reshaped or copied. Pass 1 gets
the row max and sum (online), pass 2 recomputes the logits and accumulates normalised
probabilities per key block; no logit matrix is ever stored. Matches
`xattention_select.block_scores`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsekv.attention.kernels.prefill import tile_meta


@triton.jit
def _strided_logits(q_ptr, k_ptr, bt_row, kv_off, q_base, qi, qmask, p0, ctx, j0, scale,
                    stride_qt, stride_kp, stride_ks, PAGE: tl.constexpr, STRIDE: tl.constexpr,
                    KROWS: tl.constexpr, QROWS: tl.constexpr, HEAD_DIM: tl.constexpr, ANTI: tl.constexpr,
                    PRECISION: tl.constexpr):
    """[QROWS, KROWS] scaled strided logits of query rows qi vs key rows j0.., -inf where j > i."""
    offs_d = tl.arange(0, HEAD_DIM)
    kj = j0 + tl.arange(0, KROWS)
    acc = tl.zeros([QROWS, KROWS], tl.float32)
    for t in tl.static_range(STRIDE):
        qpos = qi * STRIDE + t
        qv = qmask & (qpos >= p0) & (qpos < ctx)
        qrow = (q_base + qpos - p0).to(tl.int64)
        qt = tl.load(q_ptr + qrow[:, None] * stride_qt + offs_d[None, :], mask=qv[:, None], other=0.0)
        kpos = kj * STRIDE + (STRIDE - 1 - t if ANTI else t)
        kv = kpos < ctx
        page = tl.load(bt_row + kpos // PAGE, mask=kv, other=0).to(tl.int64)
        kt = tl.load(k_ptr + (page * stride_kp + kv_off + (kpos % PAGE) * stride_ks)[:, None] + offs_d[None, :],
                     mask=kv[:, None], other=0.0)
        acc += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision=PRECISION)
    return tl.where(kj[None, :] <= qi[:, None], acc * scale, float("-inf"))


@triton.jit
def _score_kernel(q_ptr, k_ptr, bt_ptr, out_ptr, tile_seq_ptr, tile_blk_ptr, q_start_ptr, q_len_ptr, ctx_ptr,
                  scale, stride_qt, stride_qh, stride_kp, stride_kh, stride_ks, stride_bt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
                  ROWS: tl.constexpr, QROWS: tl.constexpr, KROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ANTI: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    ctx = tl.load(ctx_ptr + seq)
    p0 = ctx - tl.load(q_len_ptr + seq)
    blk = p0 // BLOCK + tl.load(tile_blk_ptr + tile)
    r = tl.arange(0, QROWS)
    qi = blk * ROWS + r  # absolute strided query rows (rows >= ROWS are padding for tl.dot's minimum)
    qmask = r < ROWS
    row_ok = qmask & (qi * STRIDE + STRIDE > p0) & (qi * STRIDE < ctx)  # holds a real query
    q_base = q_ptr + h * stride_qh
    q_row0 = tl.load(q_start_ptr + seq)
    kv_off = (h // GROUP).to(tl.int64) * stride_kh
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    nkrows = (blk + 1) * ROWS
    m_i = tl.full([QROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([QROWS], tl.float32)
    for j0 in range(0, nkrows, KROWS):
        s = _strided_logits(q_base, k_ptr, bt_row, kv_off, q_row0, qi, qmask, p0, ctx, j0, scale, stride_qt,
                            stride_kp, stride_ks, PAGE, STRIDE, KROWS, QROWS, HEAD_DIM, ANTI, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = tl.where(row_ok & (l_i > 0), 1.0 / l_i, 0.0)
    out_row = out_ptr + tile.to(tl.int64) * stride_ot + h * stride_oh
    for j0 in range(0, nkrows, KROWS):
        s = _strided_logits(q_base, k_ptr, bt_row, kv_off, q_row0, qi, qmask, p0, ctx, j0, scale, stride_qt,
                            stride_kp, stride_ks, PAGE, STRIDE, KROWS, QROWS, HEAD_DIM, ANTI, PRECISION)
        col = tl.sum(tl.exp2(s - m_use[:, None]) * inv[:, None], 0)
        sums = tl.sum(tl.reshape(col, [KROWS // ROWS, ROWS]), 1)
        kb = j0 // ROWS + tl.arange(0, KROWS // ROWS)
        tl.store(out_row + kb, sums, mask=kb <= blk)


def xattn_block_scores(q: torch.Tensor, kv, group, block_size: int, stride: int, norm: float,
                       antidiagonal: bool = True) -> list[torch.Tensor]:
    """Block scores per sequence, fp32 [Hq, nqb, nkb] on q's device (see block_scores)."""
    hq, d = q.shape[1], q.shape[2]
    meta = tile_meta(group, block_size, q.device)
    nkb = [-(-n // block_size) for n in group.seq_lens_cpu]
    ntiles = meta.tile_seq.numel()
    out = torch.zeros(ntiles, hq, max(nkb), dtype=torch.float32, device=q.device)
    rows = block_size // stride
    krows = max(rows, 64)  # key rows per tile (several key blocks)
    _score_kernel[(ntiles, hq)](
        q, kv.k, meta.block_tables, out, meta.tile_seq, meta.tile_blk, meta.q_start, meta.q_len, meta.ctx,
        math.log2(math.e) / (math.sqrt(d) * stride * norm),
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv.k.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // kv.k.shape[1], PAGE=kv.page_size, BLOCK=block_size, STRIDE=stride, ROWS=rows,
        QROWS=max(rows, 16), KROWS=krows, HEAD_DIM=d, ANTI=antidiagonal,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    scores, start = [], 0
    for ctx, q_len, n in zip(group.seq_lens_cpu, group.q_lens_cpu, nkb):
        nqb = n - (ctx - q_len) // block_size
        scores.append(out[start:start + nqb, :, :n].transpose(0, 1))
        start += nqb
    return scores
