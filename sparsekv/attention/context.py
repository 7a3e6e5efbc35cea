"""The per-step forward context: what the attention and FFN layers of every model read.

The model runner builds it once per step (metadata, plans, where new K/V go) and sets it for the
duration of the forward pass, as vLLM's set_forward_context does, so a model file holds no
routing code: its layers call `Attention(q, k, v)` and `routed_ffn(...)` and nothing else.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from sparsekv.attention.metadata import AttnMetadata
from sparsekv.cache.kv_cache import KVCache, WriteIndex


@dataclass(eq=False)
class Route:
    """One backend with its step plan over tokens [token_start, token_end) of the step."""

    backend: Any
    plan: Any
    token_start: int
    token_end: int


@dataclass(eq=False)
class ForwardContext:
    meta: AttnMetadata
    kv_cache: KVCache
    write_index: WriteIndex
    attn_routes: list[list[Route]]  # per layer, covering every token of the step in order
    ffn_routes: list[list[Route]] = field(default_factory=list)
    observers: list[Callable] = field(default_factory=list)  # (layer, q, kv) after K/V are stored: eviction scores


_CONTEXT: list[ForwardContext] = []


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    _CONTEXT.append(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.pop()


def get_forward_context() -> ForwardContext:
    if not _CONTEXT:
        raise RuntimeError("attention layers run only inside forward_context() (the model runner sets it)")
    return _CONTEXT[-1]


def run_routes(routes: list[Route], x: torch.Tensor, call) -> torch.Tensor:
    """call(route, rows) over each route's rows of x; one route (the common case) needs no copy."""
    if len(routes) == 1:
        return call(routes[0], x)
    out = None
    for r in routes:
        part = call(r, x[r.token_start:r.token_end])
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[r.token_start:r.token_end] = part
    return out


class Attention(nn.Module):
    """The attention seam a model layer calls with its roped q, k, v ([T, H, D]): stores the new
    K/V in the paged cache, then runs each route's backend on its rows."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        ctx.kv_cache.write(self.layer, k, v, ctx.write_index)
        kv = ctx.kv_cache.layers[self.layer]
        for observe in ctx.observers:
            observe(self.layer, q, kv)
        return run_routes(ctx.attn_routes[self.layer], q,
                          lambda r, rows: r.backend.forward(rows, kv, self.layer, r.plan))
