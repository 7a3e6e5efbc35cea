"""Page selection and attention over selected pages: the parts DELTA and Quest share.

A selection is a list of *logical pool-page ids* per KV head, `[Hkv, n]` per sequence (DELTA
shares one list across heads by expanding it), padded with -1. Tokens are addressed as
`page * page_size + offset`, so a partial last page, padding and pages past the context are all
masked by one rule, `0 <= page and position < context_len`, on both the PyTorch and Triton paths.
"""
from __future__ import annotations

import torch

from sparsekv.attention.backend import AttnBatch, LayerKV
from sparsekv.attention.paged import decode_segments, kv_segments


def triton_path(q: torch.Tensor) -> bool:
    """Triton kernels on CUDA, PyTorch elsewhere (tests force the kernels under the interpreter)."""
    return q.is_cuda


def pool_ratio(page_size: int, pool_page_size: int) -> int:
    """How many pool pages make one selection page; selection pages must be whole pool pages."""
    if page_size % pool_page_size:
        raise ValueError(f"selection page_size {page_size} must be a multiple of the KV cache's "
                         f"page size {pool_page_size} (set page_size={pool_page_size} or a multiple)")
    return page_size // pool_page_size


def num_pages(context_len: int, page_size: int) -> int:
    return -(-context_len // page_size)


def select_pages(scores: torch.Tensor, pool_pages: torch.Tensor, ratio: int, reduce: str,
                 budget_pages: int, recent: int, tie_break: float) -> torch.Tensor:
    """Top pages per (sequence, head), with the last `recent` pages forced, as pool-page ids.

    scores: [B, H, N] per pool page (anything past a sequence's `pool_pages` is ignored);
    pages are scored in groups of `ratio` pool pages (`reduce`: "sum" or "max"), ranked with a
    `tie_break` bias per page that favours earlier pages, and the `budget_pages` best returned
    sorted and expanded back to pool pages: [B, H, budget_pages * ratio], -1 past the context.
    Every sequence must have more than `budget_pages` selection pages.
    """
    b, h, n = scores.shape
    identity = 0.0 if reduce == "sum" else float("-inf")
    idx = torch.arange(n, device=scores.device)
    scores = torch.where(idx < pool_pages.view(b, 1, 1), scores.float(), identity)
    pad = -n % ratio
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=identity)
    coarse = scores.view(b, h, -1, ratio)
    coarse = coarse.sum(-1) if reduce == "sum" else coarse.amax(-1)
    sel_pages = (pool_pages + ratio - 1) // ratio
    idx = torch.arange(coarse.shape[-1], device=scores.device)
    coarse = coarse - tie_break * idx
    inside = idx < sel_pages.view(b, 1, 1)
    forced = inside & (idx >= (sel_pages - recent).view(b, 1, 1))
    coarse = torch.where(forced, float("inf"), torch.where(inside, coarse, float("-inf")))
    top = coarse.topk(budget_pages, dim=-1).indices.sort(dim=-1).values  # [B, H, K]
    pool = (top.unsqueeze(-1) * ratio + torch.arange(ratio, device=top.device)).flatten(2)
    return torch.where(pool < pool_pages.view(b, 1, 1), pool, -1)


def token_mask(pages: torch.Tensor, page_size: int, context_lens: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] pool-page ids -> [B, Hkv, n * page_size]: which gathered slots hold real keys."""
    pos = pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=pages.device)
    valid = (pages.unsqueeze(-1) >= 0) & (pos < context_lens.view(-1, 1, 1, 1))
    return valid.flatten(2)


def attend_pages(q: torch.Tensor, kv: LayerKV, block_tables: list[torch.Tensor], context_lens: torch.Tensor,
                 pages: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of B sequences over their selected pages only (PyTorch path).

    q: [B, Hq, D]; pages: [B, Hkv, n]. One gather per tensor reads only the selected
    pages' bytes straight out of the pool (each (page, head) row is contiguous), then a batched
    matmul and float32 softmax with the padding masked. Returns the output [B, Hq, D] and the
    attended (query, key) pairs per sequence summed over query heads.
    """
    bsz, hq, d = q.shape
    _, hkv, ps, _ = kv.k.shape
    phys = torch.stack([bt[p.clamp(min=0)] for bt, p in zip(block_tables, pages)])  # [B, Hkv, n]
    heads = torch.arange(hkv, device=phys.device).view(1, hkv, 1)
    k = kv.k[phys, heads].view(bsz, hkv, -1, d)  # one gather of the selected (page, head) rows
    v = kv.v[phys, heads].view(bsz, hkv, -1, d)
    valid = token_mask(pages, ps, context_lens)  # [B, Hkv, L]
    s = torch.matmul(q.view(bsz, hkv, hq // hkv, d), k.transpose(-1, -2)).float() * scale
    s.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    out = torch.matmul(p, v).view(bsz, hq, d)
    return out, valid.sum((1, 2)) * (hq // hkv)


def decode_pages(q: torch.Tensor, kv: LayerKV, batch: AttnBatch,
                 pages: list[torch.Tensor | None]) -> torch.Tensor:
    """Decode attention where sequence i attends `pages[i]` ([Hkv, n] pool-page ids) or, with
    None, its whole context through the dense path (so a full budget is bit-for-bit dense)."""
    if triton_path(q):
        return _decode_pages_cuda(q, kv, batch, pages)
    out = torch.empty_like(q)
    hq = q.shape[1]
    for s, p in zip(batch.seqs, pages):
        if p is None:  # the dense backend's code path, on its threads: bit-for-bit the same
            segs = kv_segments(kv, s.block_table, s.context_len, s.page_runs)
            out[s.q_start] = decode_segments(q[s.q_start], segs, batch.scale)
            s.attended = s.context_len * hq
    sparse = [i for i, p in enumerate(pages) if p is not None]
    if not sparse:
        return out
    seqs = [batch.seqs[i] for i in sparse]
    lists = pad_stack([pages[i] for i in sparse], -1)
    rows = torch.tensor([s.q_start for s in seqs])
    res, attended = attend_pages(q[rows], kv, [s.block_table for s in seqs],
                                 torch.tensor([s.context_len for s in seqs]), lists, batch.scale)
    out[rows] = res
    for s, a in zip(seqs, attended.tolist()):
        s.attended = a
    return out


def pad_stack(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    """[H, n_i] tensors -> [B, H, max n], padded at the end with `value`."""
    n = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, n - r.shape[-1]), value=value) for r in rows])


def _decode_pages_cuda(q: torch.Tensor, kv: LayerKV, batch: AttnBatch,
                       pages: list[torch.Tensor | None]) -> torch.Tensor:
    """The Triton paged decode kernel; dense sequences get the list of all their pages."""
    from sparsekv.attention.kernels.decode import paged_decode

    hq, ps, hkv = q.shape[1], kv.page_size, kv.k.shape[1]
    if all(p is None for p in pages):
        for s in batch.seqs:
            s.attended = s.context_len * hq
        return paged_decode(q, kv, batch, page_lists=None)
    full = [p.to(q.device) if p is not None else
            torch.arange(num_pages(s.context_len, ps), device=q.device).expand(hkv, -1)
            for s, p in zip(batch.seqs, pages)]
    lists = pad_stack(full, -1)
    ctx = torch.tensor([s.context_len for s in batch.seqs], device=q.device)
    for s, a in zip(batch.seqs, (token_mask(lists, ps, ctx).sum((1, 2)) * (hq // hkv)).tolist()):
        s.attended = a
    return paged_decode(q, kv, batch, page_lists=lists)
