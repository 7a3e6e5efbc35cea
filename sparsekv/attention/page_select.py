"""Page selection and attention over selected pages: the parts DELTA and Quest share.

A selection is a list of *logical pool-page ids* per KV head, `[Hkv, n]` per sequence (DELTA
shares one list across heads by expanding it), padded with -1. Tokens are addressed as
`page * page_size + offset`, so a partial last page, padding and pages past the context are all
masked by one rule, `0 <= page and position < context_len`, on both the PyTorch and Triton paths.
"""
from __future__ import annotations

import torch

from sparsekv.attention.backend import Plan
from sparsekv.attention.dense import dense_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.kernels import cpu_decode
from sparsekv.cache.kv_cache import LayerKV


def pool_ratio(page_size: int, pool_page_size: int) -> int:
    """How many pool pages make one selection page; selection pages must be whole pool pages."""
    if page_size % pool_page_size:
        raise ValueError(f"selection page_size {page_size} must be a multiple of the KV cache's "
                         f"page size {pool_page_size} (set page_size={pool_page_size} or a multiple)")
    return page_size // pool_page_size


def num_pages(context_len: int, page_size: int) -> int:
    return -(-context_len // page_size)


def past_budget(group: BatchGroup, budget: int, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """The group's requests whose context exceeds `budget` (the others attend densely) and their
    pool-page counts on the device: what Quest and DELTA plan once per step."""
    active = [i for i, n in enumerate(group.seq_lens_cpu) if n > budget]
    pages = [num_pages(group.seq_lens_cpu[i], group.meta.page_size) for i in active]
    return active, torch.tensor(pages, device=device)


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
    """Decode attention of B requests over their selected pages only (the PyTorch reference).

    q: [B, Hq, D]; pages: [B, Hkv, n]. One gather per tensor reads only the selected
    pages' bytes straight out of the pool (each (page, head) row is contiguous), then a batched
    matmul and float32 softmax with the padding masked. Returns the output [B, Hq, D] and the
    attended (query, key) pairs per request summed over query heads.
    """
    bsz, hq, d = q.shape
    _, hkv, ps, _ = kv.k.shape
    # pages past a table (listed ahead of the context, as HiP does) read its last page, masked below
    phys = torch.stack([bt[p.clamp(0, len(bt) - 1)] for bt, p in zip(block_tables, pages)])  # [B, Hkv, n]
    heads = torch.arange(hkv, device=phys.device).view(1, hkv, 1)
    k = kv.k[phys, heads].view(bsz, hkv, -1, d)  # one gather of the selected (page, head) rows
    v = kv.v[phys, heads].view(bsz, hkv, -1, d)
    valid = token_mask(pages, ps, context_lens)  # [B, Hkv, L]
    s = torch.matmul(q.view(bsz, hkv, hq // hkv, d), k.transpose(-1, -2)).float() * scale
    s.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    out = torch.matmul(p, v).view(bsz, hq, d)
    return out, valid.sum((1, 2)) * (hq // hkv)


def decode_pages(q: torch.Tensor, kv: LayerKV, plan: Plan, pages: list[torch.Tensor | None]) -> torch.Tensor:
    """Decode attention where request i attends `pages[i]` ([Hkv, n] logical page ids) or, with
    None, its whole context through the dense path (so a full budget is bit-for-bit dense).
    Adds each request's attended pairs to plan.attended."""
    if all(p is None for p in pages):
        plan.attended += plan.dense_pairs
        return dense_decode(q, kv, plan.group, plan.scale)
    rows = [i for i, p in enumerate(pages) if p is not None]
    return decode_lists(q, kv, plan, rows, pad_stack([pages[i] for i in rows], -1))


def decode_lists(q: torch.Tensor, kv: LayerKV, plan: Plan, rows: list[int], lists: torch.Tensor,
                 tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention where requests `rows` attend their page lists [len(rows), Hkv, n] (which
    hold `tokens` real tokens each, summed over KV heads; counted here if not given) and the
    others their whole context; adds the attended pairs to plan.attended."""
    g, hq, hkv = plan.group, q.shape[1], kv.k.shape[1]
    lens = g.seq_lens[rows].long()
    if tokens is None:
        tokens = token_mask(lists, kv.page_size, lens).sum((1, 2))
    every = len(rows) == g.num_reqs
    out = None if every else torch.empty_like(q)
    if not every:
        listed = set(rows)
        dense_rows = [i for i in range(g.num_reqs) if i not in listed]
        out[dense_rows] = dense_decode(q, kv, g, plan.scale, dense_rows)
        plan.attended[dense_rows] += plan.dense_pairs[dense_rows]
    qs = q if every else q[rows]
    if cpu_decode.available() and cpu_decode.supports(q):
        bt, sl = (g.block_table, g.seq_lens) if every else (g.block_table[rows], g.seq_lens[rows])
        sel = cpu_decode.paged_decode_cpu(qs, kv.k, kv.v, bt, sl, plan.scale, page_lists=lists.to(torch.int32))
    else:
        sel, _ = attend_pages(qs, kv, [g.block_tables_cpu[i] for i in rows], lens, lists, plan.scale)
    plan.attended[rows] += tokens.to(torch.float64) * (hq // hkv)
    if every:
        return sel
    out[rows] = sel
    return out


def decode_pages_triton(q: torch.Tensor, kv: LayerKV, plan: Plan, pages: list[torch.Tensor | None]) -> torch.Tensor:
    """The Triton paged decode kernel; requests without a selection get the list of all their pages."""
    from sparsekv.attention.kernels.decode import paged_decode

    g, hq, ps, hkv = plan.group, q.shape[1], kv.page_size, kv.k.shape[1]
    if all(p is None for p in pages):
        plan.attended += plan.dense_pairs
        return paged_decode(q, kv, g, plan.scale)
    full = [p.to(q.device) if p is not None else
            torch.arange(num_pages(n, ps), device=q.device).expand(hkv, -1)
            for n, p in zip(g.seq_lens_cpu, pages)]
    lists = pad_stack(full, -1)
    plan.attended += (token_mask(lists, ps, g.seq_lens.long()).sum((1, 2)) * (hq // hkv)).to(torch.float64)
    return paged_decode(q, kv, g, plan.scale, page_lists=lists)


def pad_stack(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    """[H, n_i] tensors -> [B, H, max n], padded at the end with `value`."""
    n = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, n - r.shape[-1]), value=value) for r in rows])
