"""Quest (decode): each query keeps the pages whose keys could score highest against it.

A page's score is an upper bound of q.k over its keys from the element-wise key bounds the
cache keeps per page (LayerKV.kmin / kmax): sum_i max(q_i * kmin_i, q_i * kmax_i). Scores are
per query head, reduced by max within each GQA group, so every KV head reads its own page list
(the pages any head of its group needs). The last, partial page is always attended.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from sparsekv.attention.backend import AttentionBackend, AttnBatch, BackendParams, LayerKV, register
from sparsekv.attention.page_select import (decode_pages, num_pages, pad_stack, pool_ratio, select_pages,
                                            triton_path)


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


def _seq_bounds(q: torch.Tensor, kv: LayerKV, ids: torch.Tensor) -> torch.Tensor:
    """page_bounds over the pool pages `ids`: the bounds are read in place when the pages are
    consecutive in the pool, else gathered with index_select (whole rows)."""
    if len(ids) == 1 or bool((ids[1:] - ids[:-1] == 1).all()):
        first = int(ids[0])
        return page_bounds(q, kv.kmin[first:first + len(ids)], kv.kmax[first:first + len(ids)])
    return page_bounds(q, kv.kmin.index_select(0, ids), kv.kmax.index_select(0, ids))


@register
class QuestBackend(AttentionBackend):
    name = "quest"
    phases = ("decode",)
    Params = QuestParams

    def forward(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
        with torch.profiler.record_function("quest.select"):
            pages = self.select(q, kv, batch)  # the record_function range is reported by `bench attention`
        return decode_pages(q, kv, batch, pages)

    def select(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> list[torch.Tensor | None]:
        """Per sequence, the pool-page ids [Hkv, n] to attend, or None (dense) within the budget."""
        p = self.params
        if kv.kmin is None or kv.kmax is None:
            raise ValueError("quest needs the KV cache's per-page key bounds (LayerKV.kmin/kmax)")
        ratio = pool_ratio(p.page_size, kv.page_size)
        active = [i for i, s in enumerate(batch.seqs) if s.context_len > p.budget]
        pages: list[torch.Tensor | None] = [None] * len(batch.seqs)
        if not active:
            return pages
        seqs = [batch.seqs[i] for i in active]
        pool_pages = [num_pages(s.context_len, kv.page_size) for s in seqs]
        if triton_path(q):
            from sparsekv.attention.kernels.page_score import quest_page_scores

            scores = quest_page_scores(q, kv, batch)[active]
        else:
            scores = pad_stack([_seq_bounds(q[s.q_start], kv, s.block_table[:n])
                                for s, n in zip(seqs, pool_pages)], float("-inf"))
        sel = select_pages(scores, torch.tensor(pool_pages, device=q.device), ratio, "max",
                           p.budget // p.page_size, recent=1, tie_break=0.0)
        for i, row in zip(active, sel):
            pages[i] = row
        return pages
