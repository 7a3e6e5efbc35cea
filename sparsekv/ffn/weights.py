"""The input-major layout the sparse products read, and WINA's column norms, per projection.

A linear's weight is [out, in]; dropping input i skips column i, scattered across the rows.
Wᵀ [in, out] makes input i's weights one contiguous row, so an inactive input costs no bytes.
The copy is made once per projection (at load for the server's method, else on first use)
and kept beside the module's own weight, which the dense path keeps reading unchanged: a
dense request is bit-for-bit what it was without the sparse methods.
"""
from __future__ import annotations

import torch
from torch import nn


def _cache(linear: nn.Linear) -> dict:
    if "_ffn_layouts" not in linear.__dict__:
        linear.__dict__["_ffn_layouts"] = {}
    return linear.__dict__["_ffn_layouts"]


def transposed(linear: nn.Linear, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Wᵀ [in, out] of the linear (of its output rows [start, end) when given), contiguous."""
    key = ("wt", rows)
    cache = _cache(linear)
    if key not in cache:
        w = linear.weight if rows is None else linear.weight[rows[0]:rows[1]]
        cache[key] = w.detach().t().contiguous()
    return cache[key]


def colnorm(linear: nn.Linear) -> torch.Tensor:
    """‖W[:, i]‖₂ over the output rows, float32 [in]: WINA's weight on input i's magnitude
    (for a fused projection, the norm over all its outputs, which bounds their joint error)."""
    cache = _cache(linear)
    if "colnorm" not in cache:
        cache["colnorm"] = linear.weight.detach().float().norm(dim=0)
    return cache["colnorm"]
