"""DELTA over Mustafar's compressed cache: Δ-layers read every compressed token and choose the
compressed pages that the layers above them read.

Composes `decode.method = "delta"` with `kv.prune = "mustafar"`. A Δ-layer runs the Mustafar
decode over the whole cache and, for each request with more compressed pages than the budget
leaves beside the dense window, scores its compressed pages by DELTA's rule (per token the
largest softmax probability over the heads, summed per page) from the pruned keys, the keys
attention reads; the layers up to the next Δ-layer read the chosen pages and the whole window.
The window holds the most recent tokens, so it plays the part of DELTA's forced recent pages.
The budget counts every token read, as in Quest over Mustafar (mustafar_quest.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttnShape, Plan, register
from sparsekv.attention.delta import DeltaParams, page_mass
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.mustafar import MustafarBackend, MustafarStep, MustafarTriton, request_kv, step_of
from sparsekv.attention.mustafar_quest import past_compressed_budget, read_lists
from sparsekv.attention.page_select import pad_stack, select_pages
from sparsekv.cache.compressed import CompressedLayerKV
from sparsekv.cache.kv_prune import decompress


@dataclass(eq=False)
class MustafarDeltaPlan(Plan):
    delta_layers: tuple[int, ...]
    selection: tuple[list[int], torch.Tensor] | None = None  # this step's (active requests, chosen pages)


@register
class MustafarDeltaBackend(MustafarBackend):
    name = "mustafar_delta"
    phases = ("decode",)
    Params = DeltaParams

    def plan(self, group: BatchGroup, shape: AttnShape) -> MustafarDeltaPlan:
        base = super().plan(group, shape)
        return MustafarDeltaPlan(base.group, shape, base.attended, self.params.layers(shape.num_layers))

    def forward(self, q: torch.Tensor, kv: CompressedLayerKV, layer: int, plan: MustafarDeltaPlan) -> torch.Tensor:
        if layer not in plan.delta_layers:
            return super().forward(q, kv, layer, plan)  # the latest Δ-layer's pages, via select()
        step = step_of(kv, plan.group)
        plan.attended += plan.dense_pairs
        with torch.profiler.record_function("delta.select"):
            plan.selection = self.choose(q, kv, plan, step)
        return self.decode(q, kv, plan.group, step, plan.scale)

    def choose(self, q: torch.Tensor, kv: CompressedLayerKV, plan: Plan,
               step: MustafarStep) -> tuple[list[int], torch.Tensor] | None:
        p, g = self.params, plan.group
        ratio, keep, pool_pages, active = past_compressed_budget(p, kv, step)
        if not active:
            return None
        scores = pad_stack([self.page_scores(q[i], kv, g, i, step, plan.scale) for i in active], 0.0)
        chosen = select_pages(scores, torch.tensor([pool_pages[i] for i in active], device=scores.device), ratio,
                              "sum", keep, recent=0, tie_break=p.tie_break)
        return active, chosen

    def page_scores(self, q: torch.Tensor, kv: CompressedLayerKV, g: BatchGroup, i: int, step: MustafarStep,
                    scale: float) -> torch.Tensor:
        """[1 or Hkv, compressed pool pages] of request i: the softmax over its pruned keys and
        its window, then DELTA's page mass over the compressed tokens."""
        nc = step.num_compressed[i]
        r = request_kv(kv, g.block_tables_cpu[i], g.seq_lens_cpu[i], nc)
        hkv, d = r.k.shape[0], r.k.shape[-1]
        keys = torch.cat([decompress(r.kc, r.kb, d), r.k], 1)
        probs = (q.view(hkv, -1, d).float() @ keys.float().transpose(1, 2) * scale).softmax(-1)
        return page_mass(probs[..., :nc], kv.page_size, self.params.head_reduce)

    def select(self, q: torch.Tensor, kv: CompressedLayerKV, plan: MustafarDeltaPlan,
               step: MustafarStep) -> torch.Tensor | None:
        if plan.selection is None:  # below the first Δ-layer, or every request within the budget
            plan.attended += plan.dense_pairs
            return None
        active, chosen = plan.selection
        return read_lists(q, kv.kc.shape[1], plan, step, kv.page_size, active, chosen)


@register
class MustafarDeltaTriton(MustafarDeltaBackend, MustafarTriton):
    """The same selection, read through the Triton kernel's page lists."""

    device = "cuda"
