"""HiP / InfiniteHiP parameters and the per-sequence plans built from a search: key-block lists
per query block (prefill) and page lists per KV head (decode).

Every query block attends the first `sink` keys, the keys from `sliding_window` before its start
up to itself (causally), and the middle blocks the search keeps. The search runs with the
tree (HiP, `stages` empty: `mask_k` tokens in blocks of `block_size_k`) or the stages
(InfiniteHiP: (chunk, keep) pairs, the last giving the attended blocks).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsekv.attention.backend import BackendParams
from sparsekv.attention.hip_search import Probe, sorted_starts, stage_search, tree_search
from sparsekv.attention.xattention_select import BlockGeometry


class HiPParams(BackendParams):
    mask_k: int = Field(512, ge=1, description="middle tokens kept per query block")
    block_size_q: Literal[16, 32, 64, 128] = 64
    block_stride_q: int = Field(2, ge=1, description="every n-th query of a block scores the keys")
    block_size_k: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 2
    sliding_window: int = Field(256, ge=0)
    sink: int = Field(16, ge=0)
    representative: Literal["first", "center"] = "center"
    stages: tuple[tuple[int, int], ...] = Field((), description="InfiniteHiP (chunk, keep) stages; () = HiP's tree")
    refresh_interval: tuple[int, ...] = Field((8,), description="decode steps between mask refreshes, per stage")
    gqa_mode: Literal["per_q_head", "group_max"] = "per_q_head"
    prefill_dense_threshold: int = Field(0, ge=0, description="prefill with at most this many keys is dense")

    @model_validator(mode="after")
    def _check(self) -> "HiPParams":
        bk, stages = self.block_size_k, self.stages
        if self.mask_k % bk or self.block_size_q % bk:
            raise ValueError(f"hip: mask_k {self.mask_k} and block_size_q {self.block_size_q} must be multiples "
                             f"of block_size_k {bk}")
        if self.block_stride_q > self.block_size_q:
            raise ValueError("hip: block_stride_q is larger than block_size_q")
        if stages:
            chunks = [c for c, _ in stages]
            if stages[-1] != (bk, self.mask_k):
                raise ValueError("hip: the last stage must be (block_size_k, mask_k)")
            keeps = [k for _, k in stages]
            if any(a % b for a, b in zip(chunks, chunks[1:])) or any(k < c or k % c for c, k in stages) \
                    or keeps != sorted(keeps, reverse=True):
                raise ValueError("hip: each stage chunk must divide the one before and its keep count, "
                                 "and the keep counts must not grow")
        if len(self.refresh_interval) != max(1, len(stages)) or min(self.refresh_interval) < 1 \
                or list(self.refresh_interval) != sorted(self.refresh_interval, reverse=True):
            raise ValueError("hip: refresh_interval holds one positive, non-increasing interval per stage")
        if self.sliding_window < self.refresh_interval[0]:
            raise ValueError("hip: sliding_window must cover the tokens generated between refreshes "
                             f"(>= {self.refresh_interval[0]})")
        return self

    def search_stages(self, block: int) -> list[tuple[int, int]]:
        """The stages with the last chunk set to `block` (decode searches whole KV pages)."""
        if block % self.block_size_k:
            raise ValueError(f"hip: KV page size and block_size_k {self.block_size_k} must divide one another")
        st = list(self.stages)
        if st and any(c % block for c, _ in st[:-1]):
            raise ValueError(f"hip: stage chunks must be multiples of the KV page size {block}")
        return st[:-1] + [(block, self.mask_k)] if st else []

    def fits(self, middle_tokens: int) -> bool:
        """Full budget: every middle key would be kept, so attention is dense."""
        return middle_tokens <= self.mask_k


def search(p: HiPParams, probe: Probe, lo: torch.Tensor, hi: torch.Tensor, block: int,
           start: int = 0, cached: list | None = None) -> tuple[torch.Tensor, list]:
    """Kept middle blocks [U, n] (ascending, -1 padded) of `block` tokens for units with middle
    blocks [lo, hi), and what a decode refresh caches (the stages' outputs)."""
    stages = p.search_stages(block)
    if not stages:
        blocks, _ = tree_search(probe, lo, hi, max(1, p.mask_k // block), block, p.representative)
        return blocks, []
    outs = stage_search(probe, lo * block, hi * block, stages, p.representative, start, cached)
    s, e = outs[-1]
    return (sorted_starts(s, e) // block).clamp(min=-1), outs


def compact(parts: list[torch.Tensor], valid: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate [U, w_i] parts and keep the valid entries at the front in order: (lists, counts)."""
    ids, ok = torch.cat(parts, 1), torch.cat(valid, 1)
    order = (~ok).to(torch.int8).sort(dim=1, stable=True).indices
    counts = ok.sum(1)
    return ids.gather(1, order)[:, :int(counts.max())], counts


def ranges(lo: torch.Tensor, hi: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks lo .. hi-1 per unit as [U, width] with their validity."""
    ids = lo.view(-1, 1) + torch.arange(width, device=lo.device)
    return ids, ids < hi.view(-1, 1)


def prefill_lists(p: HiPParams, q: torch.Tensor, geom: BlockGeometry, num_kv_heads: int,
                  probe_for) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's key-block lists per unit (diagonal blocks first) for block_sparse.attend_lists.

    q [q_len, Hq, D]; probe_for(qs, unit_kv) -> Probe. Returns lists [U, m], counts [U], unit_kv [U]
    and the attended (query, key) pairs (0-d tensor)."""
    hq, dev = q.shape[1], q.device
    bq, bk, nqb = p.block_size_q, p.block_size_k, geom.num_qblocks
    ratio, group = bq // bk, hq // num_kv_heads
    shared = p.gqa_mode == "group_max"
    blk = geom.first_block + torch.arange(nqb, device=dev)
    starts = blk * bq
    sink = torch.full_like(blk, -(-p.sink // bk))
    cut = (starts - p.sliding_window).clamp(min=0) // bk  # first window block (before clamping to the sink)
    sink_end = torch.minimum(sink, blk * ratio)
    lo, hi = sink, torch.maximum(cut, sink)
    win_lo = torch.maximum(cut, sink_end)
    pos = (starts.view(-1, 1) + torch.arange(0, bq, p.block_stride_q, device=dev)).clamp(geom.q_first,
                                                                                          geom.context_len - 1)
    qs, d = q[pos - geom.q_first], q.shape[2]  # [nqb, M, Hq, D]; clamped rows repeat a real query
    if shared:
        qs = qs.view(nqb, -1, num_kv_heads, group, d).permute(2, 0, 3, 1, 4).reshape(num_kv_heads * nqb, -1, d)
        unit_kv = torch.arange(num_kv_heads, device=dev).repeat_interleave(nqb)
    else:
        qs = qs.permute(2, 0, 1, 3).reshape(hq * nqb, -1, d)
        unit_kv = torch.arange(hq, device=dev).repeat_interleave(nqb) // group
    units = qs.shape[0] // nqb

    def per_unit(x: torch.Tensor) -> torch.Tensor:
        return x.repeat(units)

    sel, _ = search(p, probe_for(qs.contiguous(), unit_kv), per_unit(lo), per_unit(hi), bk)
    diag = per_unit(blk * ratio).view(-1, 1) + torch.arange(ratio, device=dev)
    zero = per_unit(torch.zeros_like(blk))
    sink_ids, sink_ok = ranges(zero, per_unit(sink_end), max(1, int(sink_end.max())))
    win_ids, win_ok = ranges(per_unit(win_lo), per_unit(blk * ratio), max(1, int((blk * ratio - win_lo).max())))
    lists, counts = compact([diag, sink_ids, sel, win_ids],
                            [torch.ones_like(diag, dtype=torch.bool), sink_ok, sel >= 0, win_ok])
    qpb, dpairs = geom.queries_per_block().to(dev), geom.diagonal_pairs().to(dev)
    pairs = ((counts - ratio) * bk * per_unit(qpb) + per_unit(dpairs)).sum() * (group if shared else 1)
    return lists, counts, unit_kv, pairs


def middle_blocks(p: HiPParams, context_len: int, block: int) -> tuple[int, int]:
    """A decode query's middle blocks [lo, hi) of `block` tokens (hi < lo: none)."""
    return -(-p.sink // block), max(0, context_len - p.sliding_window) // block


def decode_pages(p: HiPParams, kept: torch.Tensor, context_len: int, block: int, page_size: int,
                 until: int = 0) -> torch.Tensor:
    """Pool pages [Hkv, n] a decode query attends: sink, the kept middle blocks [Hkv, m] (-1
    padded, found at the last refresh), and the window from the current token's on, through
    position `until` (default: the current token). Listing the pages of tokens still to come
    lets one list serve until the next refresh: the kernels skip positions past the context."""
    lo, cut = middle_blocks(p, context_len, block)
    end = -(-max(context_len, until) // block)
    hkv, dev = kept.shape[0], kept.device
    fixed = torch.cat([torch.arange(min(lo, end), device=dev), torch.arange(max(cut, lo), end, device=dev)])
    blocks, counts = compact([fixed.expand(hkv, -1), kept], [torch.ones(hkv, fixed.numel(), dtype=torch.bool,
                                                                         device=dev), kept >= 0])
    ratio = block // page_size
    pages = (blocks.unsqueeze(-1) * ratio + torch.arange(ratio, device=dev)).flatten(1)
    valid = torch.arange(blocks.shape[1], device=dev).repeat_interleave(ratio) < counts.view(-1, 1)
    return torch.where(valid, pages, -1)
