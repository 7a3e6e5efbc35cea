"""Quest over Mustafar's compressed cache: each KV head reads only its best compressed pages.

Composes `decode.method = "quest"` with `kv.prune = "mustafar"`. A compressed page's bounds are
the element-wise min / max of its *pruned* keys, taken when the page is compressed
(cache/compressed.py), so the Quest bound holds for the keys attention actually reads. The dense
window (under local_window + compress_chunk tokens) is always attended; the budget counts every
attended token, so the compressed pages kept are (budget - local_window - compress_chunk) //
page_size, whatever a request's window holds at this step. Within the budget the request reads
the whole compressed cache, exactly as Mustafar alone.
"""
from __future__ import annotations

import torch

from sparsekv.attention.backend import Plan, register
from sparsekv.attention.mustafar import MustafarBackend, MustafarStep, MustafarTriton
from sparsekv.attention.page_select import pad_stack, pool_ratio, select_pages
from sparsekv.attention.delta import DeltaParams
from sparsekv.attention.quest import QuestParams, seq_page_bounds
from sparsekv.cache.compressed import CompressedLayerKV, MustafarLayout
from sparsekv.cache.kv_cache import PAGE_BOUNDS


def compressed_budget_pages(params: QuestParams | DeltaParams, layout: MustafarLayout) -> int:
    """Selection pages kept among the compressed ones: what the budget leaves beside the longest
    dense window."""
    return (params.budget - layout.local_window - layout.compress_chunk) // params.page_size


def past_compressed_budget(params: QuestParams | DeltaParams, kv: CompressedLayerKV,
                           step: MustafarStep) -> tuple[int, int, list[int], list[int]]:
    """(pool pages per selection page, selection pages kept, each request's compressed pool
    pages, the requests that have more than the kept pages and so read a selection)."""
    ratio = pool_ratio(params.page_size, kv.page_size)
    keep = compressed_budget_pages(params, kv.layout)
    pool_pages = [c // kv.page_size for c in step.num_compressed]
    return ratio, keep, pool_pages, [i for i, n in enumerate(pool_pages) if -(-n // ratio) > keep]


def read_lists(q: torch.Tensor, hkv: int, plan: Plan, step: MustafarStep, ps: int, active: list[int],
               chosen: torch.Tensor) -> torch.Tensor:
    """Page lists int32 [B, Hkv, n] (-1 padded) of the compressed pages each KV head reads: the
    chosen ones ([active, 1 or Hkv, n]) for the active requests, all of them for the others;
    adds the pairs read (listed compressed tokens and the whole dense window) to the plan."""
    g, hq = plan.group, q.shape[1]
    lists = [torch.arange(c // ps).expand(hkv, -1) for c in step.num_compressed]
    for i, row in zip(active, chosen):
        lists[i] = row.expand(hkv, -1)
    lists_t = pad_stack(lists, -1).to(q.device, torch.int32)
    compressed = (lists_t >= 0).sum((1, 2)).double().to(plan.attended.device) * ps * (hq // hkv)
    window = torch.tensor([n - c for n, c in zip(g.seq_lens_cpu, step.num_compressed)], dtype=torch.float64)
    plan.attended += compressed + window.to(plan.attended.device) * hq
    return lists_t


@register
class MustafarQuestBackend(MustafarBackend):
    name = "mustafar_quest"
    phases = ("decode",)
    Params = QuestParams
    kv_spec = (PAGE_BOUNDS,)

    def select(self, q: torch.Tensor, kv: CompressedLayerKV, plan: Plan, step: MustafarStep) -> torch.Tensor | None:
        g = plan.group
        ratio, keep, pool_pages, active = past_compressed_budget(self.params, kv, step)
        if not active:
            plan.attended += plan.dense_pairs
            return None
        with torch.profiler.record_function("quest.select"):
            scores = pad_stack([seq_page_bounds(q[i], kv, g.block_tables_cpu[i][:pool_pages[i]]) for i in active],
                               float("-inf"))
            chosen = select_pages(scores, torch.tensor([pool_pages[i] for i in active]), ratio, "max", keep,
                                  recent=0, tie_break=0.0)
        return read_lists(q, kv.kc.shape[1], plan, step, kv.page_size, active, chosen)


@register
class MustafarQuestTriton(MustafarQuestBackend, MustafarTriton):
    """The same selection, read through the Triton kernel's page lists."""

    device = "cuda"
