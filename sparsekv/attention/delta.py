"""DELTA (decode): a few Δ-layers attend densely and choose the pages that later layers read.

At a Δ-layer each token is scored by its largest softmax probability over the query heads (all
heads, or each KV group's heads), tokens are summed per page, the last `recent_pages` pages are
forced, and the best pages fill `budget`. The selection goes into the step's plan and every layer
above, up to the next Δ-layer, attends only those pages in the same decode step. Layers below
the first Δ-layer are dense, and so is everything while the context fits the budget. The whole
KV cache is kept, so a later Δ-layer may pick pages an earlier one dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsekv.attention.backend import AttentionBackend, AttnShape, BackendParams, Plan, register
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.page_select import (decode_pages, decode_pages_triton, pad_stack, past_budget, pool_ratio,
                                            select_pages)
from sparsekv.attention.paged import decode_segments, kv_segments
from sparsekv.cache.kv_cache import LayerKV


class DeltaParams(BackendParams):
    delta_layers: tuple[int, ...] | None = None  # None: default_delta_layers(num_layers)
    budget: int = Field(1024, ge=1, description="tokens attended by the sparse layers")
    page_size: int = Field(16, ge=1, description="selection granularity, a multiple of the KV page size")
    recent_pages: int = Field(8, ge=0, description="last pages always selected")
    head_reduce: Literal["all", "group"] = "all"  # token score: max over all heads or per KV group
    tie_break: float = Field(1e-7, ge=0.0, description="score bias per page in favour of earlier pages")

    @model_validator(mode="after")
    def _check(self) -> "DeltaParams":
        if self.budget // self.page_size <= self.recent_pages:
            raise ValueError(f"delta: budget {self.budget} must hold more than recent_pages "
                             f"({self.recent_pages}) pages of {self.page_size} tokens")
        return self

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The Δ-layers: as given, else default_delta_layers."""
        return tuple(default_delta_layers(num_layers) if self.delta_layers is None else self.delta_layers)

    def check_model(self, shape: AttnShape) -> None:
        bad = [x for x in self.delta_layers or () if not 0 <= x < shape.num_layers]
        if bad:
            raise ValueError(f"delta: delta_layers {bad} are not layers of this {shape.num_layers}-layer model")


def default_delta_layers(num_layers: int) -> tuple[int, ...]:
    """Every 8th layer from layer 2, the first after the default dense layers [0, 1]:
    (2, 10, 18, 26) for 32 layers, (2,) for 3 to 10 layers, none for 1-2 layer models (all dense)."""
    return tuple(range(2, num_layers, 8))


def page_mass(probs: torch.Tensor, page_size: int, head_reduce: str) -> torch.Tensor:
    """probs [Hkv, G, L] -> [1 or Hkv, pages]: per page, the sum over its tokens of the token's
    largest probability over the (all, or the KV group's) heads."""
    tok = probs.amax(1) if head_reduce == "group" else probs.flatten(0, 1).amax(0, keepdim=True)
    pad = -tok.shape[-1] % page_size
    if pad:
        tok = torch.nn.functional.pad(tok, (0, pad))
    return tok.view(tok.shape[0], -1, page_size).sum(-1)


@dataclass(eq=False)
class DeltaPlan(Plan):
    delta_layers: tuple[int, ...]
    active: list[int]  # requests past the budget
    pool_pages: torch.Tensor  # their page counts
    selection: tuple[int, torch.Tensor] | None = None  # (Δ-layer, [active, 1 or Hkv, n]) of this step


@register
class DeltaBackend(AttentionBackend):
    name = "delta"
    phases = ("decode",)
    Params = DeltaParams

    def plan(self, group: BatchGroup, shape: AttnShape) -> DeltaPlan:
        base = super().plan(group, shape)
        return DeltaPlan(base.group, shape, base.attended, self.params.layers(shape.num_layers),
                         *past_budget(group, self.params.budget, base.attended.device))

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: DeltaPlan) -> torch.Tensor:
        if layer in plan.delta_layers:
            return self._delta_layer(q, kv, layer, plan)
        source = max((x for x in plan.delta_layers if x < layer), default=None)
        pages: list[torch.Tensor | None] = [None] * plan.group.num_reqs
        if plan.selection is not None and plan.selection[0] == source:
            hkv = kv.k.shape[1]
            for i, row in zip(plan.active, plan.selection[1]):
                pages[i] = row.expand(hkv, -1)
        return self.attend(q, kv, plan, pages)  # no selection (yet): dense

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: DeltaPlan, pages: list) -> torch.Tensor:
        return decode_pages(q, kv, plan, pages)

    def dense_and_scores(self, q: torch.Tensor, kv: LayerKV, plan: DeltaPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense attention for every request and the page mass [active, 1 or Hkv, pages] of those
        past the budget: the compiled decode (with its log-sum-exp) and page-mass ops where they
        build, else per request in PyTorch."""
        g = plan.group
        if cpu_decode.available() and cpu_decode.supports(q):
            out, lse = cpu_decode.paged_decode_cpu(q, kv.k, kv.v, g.block_table, g.seq_lens, plan.scale, return_lse=True)
            if not plan.active:
                return out, None
            rows = plan.active
            return out, cpu_decode.delta_page_mass_cpu(q[rows], kv.k, g.block_table[rows], g.seq_lens[rows], lse[rows],
                                                       plan.scale, self.params.head_reduce == "group")
        out, scores = torch.empty_like(q), []
        active = set(plan.active)
        for i in range(g.num_reqs):
            segs = kv_segments(kv, g.block_tables_cpu[i], g.seq_lens_cpu[i], g.page_runs[i])
            if i in active:
                out[i], probs = decode_segments(q[i], segs, plan.scale, return_probs=True)
                scores.append(page_mass(probs, kv.page_size, self.params.head_reduce))
            else:
                out[i] = decode_segments(q[i], segs, plan.scale)
        return out, pad_stack(scores, 0.0) if scores else None

    def _delta_layer(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: DeltaPlan) -> torch.Tensor:
        """Dense attention for every request; a fresh selection for those past the budget."""
        p = self.params
        out, scores = self.dense_and_scores(q, kv, plan)
        plan.attended += plan.dense_pairs
        if scores is not None:
            with torch.profiler.record_function("delta.select"):  # reported by `bench attention`
                sel = select_pages(scores, plan.pool_pages, pool_ratio(p.page_size, kv.page_size), "sum",
                                   p.budget // p.page_size, p.recent_pages, p.tie_break)
            plan.selection = (layer, sel)
        return out


@register
class DeltaTriton(DeltaBackend):
    """The dense Triton decode (which also returns each head's log-sum-exp), then a second pass
    that turns q.k and the log-sum-exp into the per-page probability mass."""

    device = "cuda"

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: DeltaPlan, pages: list) -> torch.Tensor:
        return decode_pages_triton(q, kv, plan, pages)

    def dense_and_scores(self, q: torch.Tensor, kv: LayerKV, plan: DeltaPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        from sparsekv.attention.kernels.decode import paged_decode
        from sparsekv.attention.kernels.page_score import delta_page_scores

        out, lse = paged_decode(q, kv, plan.group, plan.scale, return_lse=True)
        if not plan.active:
            return out, None
        scores = delta_page_scores(q, kv, plan.group, plan.scale, lse, self.params.head_reduce == "group")
        return out, scores[plan.active]
