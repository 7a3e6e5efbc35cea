"""True block attention mass from captured Q/K, and how much of it a prefill selection covers.

A block-sparse prefill method is only as good as the key blocks it keeps; this measures the keep
against dense attention itself rather than against the method's own estimate.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sparsekv.attention.xattention import XAttentionParams
from sparsekv.attention.xattention_select import BlockGeometry, block_scores, head_thresholds, select_blocks


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, rows: slice | None = None) -> torch.Tensor:
    """Causal dense attention mass per (query head, query block, key block), fp32.

    q: [Hq, N, D], k: [Hkv, N, D] post-rope, one sequence from position 0. Each query's softmax
    is summed per key block, then divided by the queries in the block, so every row sums to 1.
    `rows` restricts the queries (e.g. the last one) and gives a single query block.
    """
    hq, n, d = q.shape
    group = hq // k.shape[0]
    nkb = -(-n // block_size)
    kr = k.repeat_interleave(group, 0)
    spans = [(rows.start or 0, rows.stop or n)] if rows else [(a, min(a + block_size, n)) for a in range(0, n, block_size)]
    out = torch.zeros(hq, len(spans), nkb)
    for i, (a, b) in enumerate(spans):
        s = torch.einsum("hqd,hkd->hqk", q[:, a:b], kr[:, :b]) / math.sqrt(d)
        s.masked_fill_(torch.arange(b).view(1, -1) > torch.arange(a, b).view(-1, 1), float("-inf"))
        p = torch.softmax(s, -1).mean(1)
        pad = nkb * block_size - b
        out[:, i] = torch.nn.functional.pad(p, (0, pad)).view(hq, nkb, block_size).sum(-1)
    return out


def xattention_selection(params: dict, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """XAttention's selected blocks [Hq, nqb, nkb] for a whole prompt (the CPU scorer), and its block size."""
    p = XAttentionParams.model_validate(params)
    n = q.shape[1]
    geom = BlockGeometry(p.block_size, n, n)
    pad = geom.num_kblocks * p.block_size - n
    qp, kp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k))
    scores = block_scores(qp, kp, geom, p.stride, p.norm, p.select_mode == "antidiagonal")
    sel = select_blocks(scores, head_thresholds(p.threshold, layer, q.shape[0]), 0)
    if p.gqa_mode == "group_max":
        g = q.shape[0] // k.shape[0]
        sel = sel.view(-1, g, *sel.shape[1:]).any(1, keepdim=True).expand(-1, g, -1, -1).reshape(sel.shape)
    return sel, p.block_size


# prefill methods whose selection can be recomputed offline from Q/K
SELECTIONS: dict[str, Callable[[dict, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]] = {
    "xattention": xattention_selection,
}


def recall(mass: torch.Tensor, sel: torch.Tensor) -> dict[str, float]:
    """How much of dense attention a selection keeps, averaged over (head, query block) rows.

    mass_recall: the share of attention mass in selected blocks; topk_recall: the share of the
    true top-n blocks (n = the row's selected count) that were selected; density: selected share
    of causal blocks.
    """
    hq, nqb, nkb = mass.shape
    causal = torch.arange(nkb).view(1, -1) <= torch.arange(nqb).view(-1, 1)
    n_sel = sel.sum(-1)
    rank = mass.masked_fill(~causal, -1).argsort(-1, descending=True).argsort(-1)
    top = rank < n_sel.unsqueeze(-1)
    return {"mass_recall": float(((mass * sel).sum(-1) / mass.sum(-1)).mean()),
            "topk_recall": float(((top & sel).sum(-1) / n_sel.clamp(min=1)).mean()),
            "density": float(sel.sum() / (causal.sum() * hq))}
