"""HiP's key search: the hierarchical top-k tree (HiP, ICLR'25) and multi-stage chunk pruning
(InfiniteHiP), on any device.

A *unit* is one query block of one head (or of a GQA group, its queries stacked). Both searches
choose only among the unit's middle keys, the range [lo, hi) between the sink and the sliding
window, and see keys only through a `Probe`: the score of a key range for each unit, the max
over the unit's queries and the range's keys of q.k. The probe is the whole cost (a Triton
kernel on CUDA; on the CPU the compiled probe, which also runs the whole tree in one call, or
`torch_probe`, the reference); the branching and top-k bookkeeping stays in torch.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch

from sparsekv.attention.kernels import cpu_hip

Probe = Callable[[torch.Tensor, int], torch.Tensor]  # (starts [U, C] in tokens, -1: none; width) -> [U, C]


@runtime_checkable
class TreeProbe(Protocol):
    """A probe that runs tree_search's rounds itself (selecting exactly as the loop does)."""

    def __call__(self, starts: torch.Tensor, width: int) -> torch.Tensor: ...

    def tree(self, lo: torch.Tensor, hi: torch.Tensor, keep: int, block: int, rounds: int,
             center: bool) -> torch.Tensor: ...


def tree_rounds(num_blocks: int, keep: int) -> int:
    """Branching rounds until every node is one block: ceil(log2(num_blocks / keep)), 0 if it fits."""
    return max(0, math.ceil(math.log2(num_blocks / keep))) if num_blocks > 0 else 0


def tree_search(probe: Probe, lo: torch.Tensor, hi: torch.Tensor, keep: int, block: int,
                representative: str) -> tuple[torch.Tensor, int]:
    """HiP's top-k tree: `keep` nodes evenly partition each unit's blocks [lo, hi); each round
    splits every node in two, scores each half by its representative block (its first or its
    center block) and keeps the best `keep` halves, until every node is one block. Ties go to
    the earlier half (torch.topk left them unspecified): nodes stay in position order, so a
    stable sort of the halves by score picks the same set on any device and in the fused CPU op.

    lo, hi: [U] in blocks of `block` tokens. Returns the selected blocks [U, keep], ascending,
    -1 past a unit's count (units with at most `keep` blocks keep all), and the rounds run.
    """
    rounds = tree_rounds(int((hi - lo).max()), keep)
    if isinstance(probe, TreeProbe):
        return probe.tree(lo, hi, keep, block, rounds, representative == "center"), rounds
    j = torch.arange(keep + 1, device=lo.device)
    bounds = lo.view(-1, 1) + ((hi - lo).view(-1, 1) * j) // keep
    s, e = bounds[:, :-1], bounds[:, 1:]
    for _ in range(rounds):
        m = s + (e - s + 1) // 2
        cs, ce = torch.stack([s, m], 2).flatten(1), torch.stack([m, e], 2).flatten(1)  # position order
        score = probe(_representative(cs, ce, representative) * block, block)
        top = score.sort(dim=1, descending=True, stable=True).indices[:, :keep].sort(dim=1).values
        s, e = cs.gather(1, top), ce.gather(1, top)
    return sorted_starts(s, e), rounds


def sorted_starts(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Node starts of non-empty nodes ascending, -1 padded at the end."""
    big = torch.iinfo(s.dtype).max
    out = torch.where(e > s, s, big).sort(1).values
    return out.masked_fill_(out == big, -1)


def _representative(s: torch.Tensor, e: torch.Tensor, how: str) -> torch.Tensor:
    """The probe position of each range [s, e): its first or its center element; -1 when empty."""
    rep = s if how == "first" else s + (e - s - 1).clamp(min=0) // 2
    return torch.where(e > s, rep, -1)


def split_chunks(s: torch.Tensor, e: torch.Tensor, chunk: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges [U, C] of at most `span` tokens -> chunks of `chunk` tokens from each start [U, C*n]."""
    n = -(-span // chunk)
    cs = s.unsqueeze(-1) + torch.arange(n, device=s.device) * chunk
    ce = torch.minimum(cs + chunk, e.unsqueeze(-1))
    return cs.flatten(1), ce.flatten(1)


def top1_scores(probe: Probe, cs: torch.Tensor, ce: torch.Tensor, chunk: int, representative: str) -> torch.Tensor:
    """InfiniteHiP's hierarchical top-1: per chunk halve the range log2(chunk) times, probing one
    token per half and following the better half; the chunk scores as its last winning probe.
    Chunks with ce <= cs score -inf."""
    a, b = cs, ce
    score = None
    for _ in range(math.ceil(math.log2(chunk))):
        m = a + (b - a + 1) // 2
        ls, le, rs, re = a, m, m, b
        starts = torch.cat([_representative(ls, le, representative), _representative(rs, re, representative)], 1)
        sl, sr = probe(starts, 1).chunk(2, dim=1)
        right = sr > sl
        a, b = torch.where(right, rs, ls), torch.where(right, re, le)
        score = torch.maximum(sl, sr)
    if score is None:  # one-token chunks: the token is its own representative
        score = probe(torch.where(ce > cs, cs, -1), 1)
    return score


def prune_stage(probe: Probe, s: torch.Tensor, e: torch.Tensor, span: int, chunk: int, keep: int,
                representative: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One InfiniteHiP stage: split the surviving ranges [U, C] (each at most `span` tokens) into
    `chunk`-token chunks, score each by hierarchical top-1 and keep the best keep // chunk.
    Returns the kept chunks (start, end) [U, keep // chunk] (end <= start: none)."""
    cs, ce = split_chunks(s, e, chunk, span)
    score = top1_scores(probe, cs, ce, chunk, representative)
    n = min(keep // chunk, cs.shape[1])
    top = score.topk(n, dim=1).indices
    return cs.gather(1, top), ce.gather(1, top)


Ranges = tuple[torch.Tensor, torch.Tensor]  # (start, end) [U, C] token ranges; end <= start: none


def stage_search(probe: Probe, lo: torch.Tensor, hi: torch.Tensor, stages: list[tuple[int, int]],
                 representative: str, start: int = 0, cached: list[Ranges] | None = None) -> list[Ranges]:
    """All stages (chunk, keep) from `start` on, over the middle tokens [lo, hi) [U]; stage
    `start` takes its input from cached[start - 1]. Returns every stage's kept chunks; the
    outputs are nested (each stage splits and keeps a subset of the one before)."""
    outs = list(cached[:start]) if cached else []
    s, e = outs[-1] if outs else (lo.view(-1, 1), hi.view(-1, 1))
    span = stages[start - 1][0] if start else int((hi - lo).max().clamp(min=1))
    for chunk, keep in stages[start:]:
        s, e = prune_stage(probe, s, e, span, chunk, keep, representative)
        outs.append((s, e))
        span = chunk
    return outs


def torch_probe(qs: torch.Tensor, k: torch.Tensor, unit_kv: torch.Tensor, budget: int = 1 << 22) -> Probe:
    """The CPU probe. qs [U, M, D] the units' (strided) queries, padded by repeating a real one;
    k [Hkv, L, D] the sequence's keys (any strides: a view of the pool is read in place, only
    the probed rows are gathered); unit_kv [U]."""
    hkv, length, d = k.shape
    heads = unit_kv.view(-1, 1, 1)
    flat = k.view(hkv * length, d) if k.is_contiguous() else None  # index_select: ~1.5x advanced indexing

    def probe(starts: torch.Tensor, width: int) -> torch.Tensor:
        u, c = starts.shape
        pos = (starts.unsqueeze(-1) + torch.arange(width, device=starts.device)).clamp(min=0)
        out = torch.empty(u, c, dtype=torch.float32, device=starts.device)
        step = max(1, budget // max(1, c * width * d))
        for a in range(0, u, step):
            if flat is None:
                keys = k[heads[a:a + step], pos[a:a + step]]
            else:
                keys = flat.index_select(0, (heads[a:a + step] * length + pos[a:a + step]).view(-1))
            keys = keys.view(-1, c * width, d)  # [u, C*W, D]
            s = torch.bmm(qs[a:a + step], keys.transpose(1, 2).to(qs.dtype)).float()
            out[a:a + step] = s.amax(1).view(-1, c, width).amax(-1)
        return out.masked_fill_(starts < 0, float("-inf"))

    return probe


def cpu_probe(qs: torch.Tensor, k: torch.Tensor, unit_kv: torch.Tensor) -> Probe:
    """The compiled probe (a TreeProbe) where it builds and the inputs are fp32, else torch_probe."""
    if cpu_hip.supports(qs, k) and cpu_hip.available():
        return cpu_hip.CpuProbe(qs, k, unit_kv)
    return torch_probe(qs, k, unit_kv)
