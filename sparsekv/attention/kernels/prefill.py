"""Triton prefill attention over the paged KV cache, dense or block-sparse (FlashAttention-2 style).

One program per (query tile, query head); it walks key tiles read through the block table with
an online softmax. With `BlockLists` it visits only the listed key blocks of its query block;
without, every causal key, so the same kernel is the dense CUDA prefill. K/V of a query head
come from KV head h // G in place (GQA without copies). Operands are upcast to fp32 before
tl.dot: the Triton interpreter mishandles 16-bit dots, and bf16 -> tf32 is exact on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DENSE_BLOCK = 64  # query/key tile of the dense path


@dataclass
class BlockLists:
    """Selected key blocks per (sequence, query head, query block), in CSR form.

    Query blocks are `block_size` tokens on the absolute grid: a sequence whose queries are positions
    [ctx - q_len, ctx) owns query blocks I = (ctx - q_len) // B .. ceil(ctx / B) - 1, numbered
    locally b = I - (ctx - q_len) // B. Row r = row_start[s] + h * nqb_s + b lists its absolute
    key block ids in indices[indptr[r]:indptr[r + 1]], in any order: blocks of `key_block` tokens
    (block_size by default; a divisor of it for HiP), none past the query block. The list should
    cover the diagonal, or rows of queries with no key come out as zeros.
    """

    block_size: int
    indptr: torch.Tensor  # int32 [rows + 1]
    indices: torch.Tensor  # int32 [nnz]
    row_start: torch.Tensor  # int32 [num_seqs]
    key_block: int = 0  # 0: block_size

    def __post_init__(self) -> None:
        self.key_block = self.key_block or self.block_size

    @classmethod
    def from_masks(cls, masks: list[torch.Tensor], block_size: int) -> "BlockLists":
        """From one bool mask [Hq, nqb, nkb] per sequence (True = compute that block)."""
        flat = [m.reshape(-1, m.shape[-1]) for m in masks]
        counts = torch.cat([f.sum(-1) for f in flat])
        dev = counts.device
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=dev)
        indptr[1:] = counts.cumsum(0)
        indices = torch.cat([f.nonzero()[:, 1] for f in flat]).to(torch.int32)
        sizes = torch.tensor([0] + [f.shape[0] for f in flat[:-1]], device=dev)
        return cls(block_size, indptr, indices, sizes.cumsum(0).to(torch.int32))


@dataclass
class TileMeta:
    """Host-built launch metadata shared by the prefill and scoring kernels."""

    tile_seq: torch.Tensor  # int32 [tiles]: sequence of each query-block tile
    tile_blk: torch.Tensor  # int32 [tiles]: local query block of the tile
    q_start: torch.Tensor  # int32 [num_seqs]
    q_len: torch.Tensor
    ctx: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_pages]


def tile_meta(group, block_size: int, device: torch.device) -> TileMeta:
    """One tile per (request, query block on the absolute grid), built once per step."""
    return group.memo(("tiles", block_size), lambda: _tile_meta(group, block_size, device))


def _tile_meta(group, block_size: int, device: torch.device) -> TileMeta:
    ctx = torch.tensor(group.seq_lens_cpu)
    q_len = torch.tensor(group.q_lens_cpu)
    nqb = (ctx + block_size - 1) // block_size - (ctx - q_len) // block_size
    tile_seq = torch.repeat_interleave(torch.arange(group.num_reqs), nqb)
    first = torch.cumsum(nqb, 0) - nqb
    tile_blk = torch.arange(int(nqb.sum())) - first[tile_seq]

    def dev(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=torch.int32)

    return TileMeta(dev(tile_seq), dev(tile_blk), group.query_start, group.q_lens, group.seq_lens, group.block_table)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, pos, offs_n, kvalid, k_ptr, v_ptr, bt_row, kv_off,
                 stride_kp, stride_ks, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update with the keys at positions `offs_n` (where kvalid), causal against `pos`."""
    offs_d = tl.arange(0, HEAD_DIM)
    page = tl.load(bt_row + offs_n // PAGE, mask=kvalid, other=0).to(tl.int64)
    off = page * stride_kp + kv_off + (offs_n % PAGE) * stride_ks
    k = tl.load(k_ptr + off[:, None] + offs_d[None, :], mask=kvalid[:, None], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = tl.where((offs_n[None, :] <= pos[:, None]) & kvalid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + off[:, None] + offs_d[None, :], mask=kvalid[:, None], other=0.0).to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, tile_seq_ptr, tile_blk_ptr, q_start_ptr, q_len_ptr,
                    ctx_ptr, row_start_ptr, indptr_ptr, indices_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_kh, stride_ks, stride_bt,
                    GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPARSE: tl.constexpr, KEY_BLOCK: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    sub = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    b = tl.load(tile_blk_ptr + tile)
    ctx = tl.load(ctx_ptr + seq)
    p0 = ctx - tl.load(q_len_ptr + seq)
    blk = p0 // BLOCK + b
    pos = blk * BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = (pos >= p0) & (pos < ctx)
    rows = (tl.load(q_start_ptr + seq) + pos - p0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=qvalid[:, None], other=0.0).to(tl.float32) * scale
    kv_off = (h // GROUP).to(tl.int64) * stride_kh
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    end = tl.minimum(blk * BLOCK + (sub + 1) * BLOCK_M, ctx)  # keys past the tile's last query are masked
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lane = tl.arange(0, BLOCK_N)
    if SPARSE:
        # the listed blocks' keys laid end to end, BLOCK_N at a time: several small blocks share a
        # tile, or a large block spans several tiles
        nqb = (ctx + BLOCK - 1) // BLOCK - p0 // BLOCK
        row = tl.load(row_start_ptr + seq) + h * nqb + b
        e_lo = tl.load(indptr_ptr + row)
        e_hi = tl.load(indptr_ptr + row + 1)
        for start in range(e_lo * KEY_BLOCK, e_hi * KEY_BLOCK, BLOCK_N):
            flat = start + lane
            listed = flat < e_hi * KEY_BLOCK
            kb = tl.load(indices_ptr + flat // KEY_BLOCK, mask=listed, other=0)
            offs_n = kb * KEY_BLOCK + flat % KEY_BLOCK
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, pos, offs_n, listed & (offs_n < end), k_ptr, v_ptr,
                                         bt_row, kv_off, stride_kp, stride_ks, PAGE, HEAD_DIM, PRECISION)
    else:
        for start in range(0, end, BLOCK_N):
            offs_n = start + lane
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, pos, offs_n, offs_n < end, k_ptr, v_ptr, bt_row, kv_off,
                                         stride_kp, stride_ks, PAGE, HEAD_DIM, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=qvalid[:, None])


def paged_prefill(q: torch.Tensor, kv, group, scale: float, block_lists: BlockLists | None = None) -> torch.Tensor:
    """Causal attention of each request's q_len queries over its paged keys [0, context_len).

    q: the group's rows [sum(q_len), Hq, D] -> same shape. block_lists=None: dense.
    """
    hq, d = q.shape[1], q.shape[2]
    assert q.stride(2) == 1 and kv.k.stride() == kv.v.stride() and kv.k.stride(3) == 1
    sparse = block_lists is not None
    block = block_lists.block_size if sparse else DENSE_BLOCK
    meta = tile_meta(group, block, q.device)
    lists = (block_lists.row_start, block_lists.indptr, block_lists.indices) if sparse else (meta.ctx,) * 3
    out = torch.empty_like(q)
    bm = bn = min(block, 64)
    _prefill_kernel[(meta.tile_seq.numel(), hq, block // bm)](
        q, kv.k, kv.v, out, meta.block_tables, meta.tile_seq, meta.tile_blk, meta.q_start, meta.q_len,
        meta.ctx, *lists, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), kv.k.stride(0), kv.k.stride(1), kv.k.stride(2),
        meta.block_tables.stride(0),
        GROUP=hq // kv.k.shape[1], PAGE=kv.page_size, BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
        SPARSE=sparse, KEY_BLOCK=block_lists.key_block if sparse else block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out
