"""DELTA (decode): a few Δ-layers attend densely and choose the pages that later layers read.

At a Δ-layer each token is scored by its largest softmax probability over the query heads (all
heads, or each KV group's heads), tokens are summed per page, the last `recent_pages` pages are
forced, and the best pages fill `budget`. The selection goes into `seq.state` and every layer
above, up to the next Δ-layer, attends only those pages in the same decode step. Layers below
the first Δ-layer are dense, and so is everything while the context fits the budget. The whole
KV cache is kept, so a later Δ-layer may pick pages an earlier one dropped.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsekv.attention.backend import AttentionBackend, AttnBatch, BackendParams, LayerKV, register
from sparsekv.attention.page_select import (decode_pages, num_pages, pad_stack, pool_ratio, select_pages,
                                            triton_path)
from sparsekv.attention.paged import decode_segments, kv_segments

STATE_KEY = "delta"  # seq.state[STATE_KEY] = (delta layer, context_len, pool-page ids [1 or Hkv, n])


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


def default_delta_layers(num_layers: int) -> tuple[int, ...]:
    """Every 8th layer from layer 2, the first after the default dense layers [0, 1]:
    (2, 10, 18, 26) for 32 layers, (2,) for 3 to 10 layers, none for 1-2 layer models (all dense)."""
    return tuple(range(2, num_layers, 8))


@register
class DeltaBackend(AttentionBackend):
    name = "delta"
    phases = ("decode",)
    Params = DeltaParams

    def forward(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
        p = self.params
        layers = p.delta_layers if p.delta_layers is not None else default_delta_layers(batch.num_layers)
        if batch.layer in layers:
            return self._delta_layer(q, kv, batch)
        source = max((layer for layer in layers if layer < batch.layer), default=None)
        hkv = kv.k.shape[1]
        pages = []
        for s in batch.seqs:
            st = s.state.get(STATE_KEY)
            fresh = st is not None and st[:2] == (source, s.context_len) and s.context_len > p.budget
            pages.append(st[2].expand(hkv, -1) if fresh else None)  # no selection (yet): dense
        return decode_pages(q, kv, batch, pages)

    def _delta_layer(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
        """Dense attention for every sequence; a fresh selection for those past the budget."""
        p = self.params
        ratio = pool_ratio(p.page_size, kv.page_size)
        active = [i for i, s in enumerate(batch.seqs) if s.context_len > p.budget]
        if triton_path(q):
            out, scores = _dense_and_scores_cuda(q, kv, batch, p.head_reduce == "group")
            scores = scores[active] if active else None
        else:
            out, scores = torch.empty_like(q), []
            for s in batch.seqs:
                segs = kv_segments(kv, s.block_table, s.context_len, s.page_runs)
                if s.context_len > p.budget:
                    out[s.q_start], probs = decode_segments(q[s.q_start], segs, batch.scale, return_probs=True)
                    scores.append(self._page_mass(probs, kv.page_size))
                else:
                    out[s.q_start] = decode_segments(q[s.q_start], segs, batch.scale)
            scores = pad_stack(scores, 0.0) if scores else None
        for s in batch.seqs:
            s.attended = s.context_len * q.shape[1]
        if scores is not None:
            seqs = [batch.seqs[i] for i in active]
            pool_pages = torch.tensor([num_pages(s.context_len, kv.page_size) for s in seqs], device=q.device)
            with torch.profiler.record_function("delta.select"):  # reported by `bench attention`
                sel = select_pages(scores, pool_pages, ratio, "sum", p.budget // p.page_size, p.recent_pages,
                                   p.tie_break)
            for s, pages in zip(seqs, sel):
                s.state[STATE_KEY] = (batch.layer, s.context_len, pages)
        return out

    def _page_mass(self, probs: torch.Tensor, page_size: int) -> torch.Tensor:
        """probs [Hkv, G, L] -> [1 or Hkv, pool pages]: per page, the sum over its tokens of the
        token's largest probability over the (all or the group's) heads."""
        tok = probs.amax(1) if self.params.head_reduce == "group" else probs.flatten(0, 1).amax(0, keepdim=True)
        pad = -tok.shape[-1] % page_size
        if pad:
            tok = torch.nn.functional.pad(tok, (0, pad))
        return tok.view(tok.shape[0], -1, page_size).sum(-1)


def _dense_and_scores_cuda(q: torch.Tensor, kv: LayerKV, batch: AttnBatch,
                           per_group: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense Triton decode (which also returns each head's log-sum-exp), then a second pass
    that turns q.k and the log-sum-exp into the per-page probability mass."""
    from sparsekv.attention.kernels.decode import paged_decode
    from sparsekv.attention.kernels.page_score import delta_page_scores

    out, lse = paged_decode(q, kv, batch, page_lists=None, return_lse=True)
    return out, delta_page_scores(q, kv, batch, lse, per_group)
