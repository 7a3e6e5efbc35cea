"""Quest (decode): each query keeps the pages whose keys could score highest against it.

A page's score is an upper bound of q.k over its keys from the element-wise key bounds the
cache keeps per page (the PAGE_BOUNDS side table, allocated once Quest runs): sum_i max(q_i * kmin_i, q_i * kmax_i). Scores are
per query head, reduced by max within each GQA group, so every KV head reads its own page list
(the pages any head of its group needs). The last, partial page is always attended.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from sparsekv.attention.backend import AttentionBackend, AttnShape, BackendParams, Plan, register
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.dense import dense_decode
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.page_select import (decode_lists, decode_pages_triton, pad_stack, past_budget, pool_ratio,
                                            select_pages)
from sparsekv.cache.kv_cache import PAGE_BOUNDS, LayerKV


class QuestParams(BackendParams):
    page_size: int = Field(16, ge=1, description="selection page, a multiple of the KV page size")
    budget: int = Field(1024, ge=1, description="tokens attended per KV head")

    @model_validator(mode="after")
    def _check(self) -> "QuestParams":
        if self.budget < 3 * self.page_size:
            raise ValueError(f"quest: budget {self.budget} must be at least 3 pages of {self.page_size} tokens")
        return self


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k per page, max over each KV group's query heads.

    q: [Hq, D]; kmin, kmax: [n, Hkv, D] -> float32 [Hkv, n]. Split q by sign,
    sum_i max(q_i kmin_i, q_i kmax_i) = q+ . kmax + q- . kmin: two matmuls that read the bounds
    once, instead of an [Hq, n, D] temporary.
    """
    hkv, d = kmin.shape[1], kmin.shape[2]
    qg = q.view(hkv, -1, d).to(kmin.dtype).transpose(1, 2)  # [Hkv, D, G]
    ub = torch.matmul(kmax.transpose(0, 1), qg.clamp(min=0)).float()
    ub += torch.matmul(kmin.transpose(0, 1), qg.clamp(max=0)).float()  # [Hkv, n, G]
    return ub.amax(-1)


def seq_page_bounds(q: torch.Tensor, kv: LayerKV, ids: torch.Tensor) -> torch.Tensor:
    """page_bounds over the pool pages `ids`: the bounds are read in place when the pages are
    consecutive in the pool, else gathered with index_select (whole rows)."""
    if len(ids) == 1 or bool((ids[1:] - ids[:-1] == 1).all()):
        first = int(ids[0])
        return page_bounds(q, kv.kmin[first:first + len(ids)], kv.kmax[first:first + len(ids)])
    return page_bounds(q, kv.kmin.index_select(0, ids), kv.kmax.index_select(0, ids))


@dataclass(eq=False)
class QuestPlan(Plan):
    active: list[int]  # requests past the budget (the others attend densely)
    pool_pages: torch.Tensor  # their page counts, on the device


@register
class QuestBackend(AttentionBackend):
    name = "quest"
    phases = ("decode",)
    Params = QuestParams
    kv_spec = (PAGE_BOUNDS,)

    def plan(self, group: BatchGroup, shape: AttnShape) -> QuestPlan:
        base = super().plan(group, shape)
        return QuestPlan(base.group, shape, base.attended, *past_budget(group, self.params.budget, base.attended.device))

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: QuestPlan) -> torch.Tensor:
        with torch.profiler.record_function("quest.select"):  # the range `bench attention` reports
            chosen = self.choose(q, kv, plan) if plan.active else None
        return self.attend(q, kv, plan, chosen)

    def choose(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Page lists [active, Hkv, n] of the requests past the budget, and the tokens they hold
        (None: counted where attended). On CPU one compiled op scores and picks."""
        p = self.params
        ratio, keep = pool_ratio(p.page_size, kv.page_size), p.budget // p.page_size
        if cpu_decode.available() and cpu_decode.supports(q):
            g, rows = plan.group, plan.active
            return cpu_decode.quest_select_cpu(q[rows], kv.kmin, kv.kmax, g.block_table[rows], g.seq_lens[rows],
                                               kv.page_size, ratio, keep, recent=1)
        return self.ranked(q, kv, plan), None

    def ranked(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> torch.Tensor:
        """The selection from `scores` (the PyTorch form; the compiled op applies the same rule)."""
        p = self.params
        return select_pages(self.scores(q, kv, plan), plan.pool_pages, pool_ratio(p.page_size, kv.page_size), "max",
                            p.budget // p.page_size, recent=1, tie_break=0.0)

    def scores(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> torch.Tensor:
        """[active, Hkv, pages] upper bounds, -inf padded."""
        g = plan.group
        return pad_stack([seq_page_bounds(q[i], kv, g.block_tables_cpu[i][:n])
                          for i, n in zip(plan.active, plan.pool_pages.tolist())], float("-inf"))

    def select(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> list[torch.Tensor | None]:
        """Per request, the logical page ids [Hkv, n] to attend, or None (dense) within the budget."""
        pages: list[torch.Tensor | None] = [None] * plan.group.num_reqs
        if plan.active:
            for i, row in zip(plan.active, self.choose(q, kv, plan)[0]):
                pages[i] = row
        return pages

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan,
               chosen: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
        if chosen is None:  # every request within the budget
            plan.attended += plan.dense_pairs
            return dense_decode(q, kv, plan.group, plan.scale)
        return decode_lists(q, kv, plan, plan.active, *chosen)


@register
class QuestTriton(QuestBackend):
    device = "cuda"

    def choose(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> tuple[torch.Tensor, None]:
        return self.ranked(q, kv, plan), None

    def scores(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan) -> torch.Tensor:
        from sparsekv.attention.kernels.page_score import quest_page_scores

        return quest_page_scores(q, kv, plan.group)[plan.active]

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: QuestPlan,
               chosen: tuple[torch.Tensor, None] | None) -> torch.Tensor:
        pages: list[torch.Tensor | None] = [None] * plan.group.num_reqs
        for i, row in zip(plan.active, chosen[0] if chosen is not None else ()):
            pages[i] = row
        return decode_pages_triton(q, kv, plan, pages)
