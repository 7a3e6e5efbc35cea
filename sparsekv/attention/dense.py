"""Dense attention over the paged cache: the baseline every sparse method must reproduce.

CPU decode runs the whole group in one call of the compiled paged-decode kernel (reading pages
in place, split-K over 2+ threads); where it cannot be built, the PyTorch path decodes request by
request over in-place segments. Decode honours per-row lengths (BatchGroup.row_lens: eviction
with per-layer or per-head budgets), reading only each KV head's kept tokens. Prefill runs SDPA's
flash kernel per request. CUDA uses the Triton kernels with every page listed.
"""
from __future__ import annotations

import torch

from sparsekv.attention.backend import AttentionBackend, Plan, register
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.paged import decode_rows, decode_segments, kv_segments, prefill_attention, request_kv
from sparsekv.cache.kv_cache import LayerKV


def dense_decode_torch(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float,
                       rows: list[int] | None = None, layer: int = 0) -> torch.Tensor:
    """The PyTorch reference decode of the group's requests (or `rows` of them), one at a time:
    q holds every request's row; the output has one row per decoded request. A request whose
    rows in `layer` are shorter than its context reads each KV head's last row_lens tokens."""
    rows = range(group.num_reqs) if rows is None else rows
    out = q.new_empty((len(rows), *q.shape[1:]))
    tables, lens, runs = group.block_tables_cpu, group.seq_lens_cpu, group.page_runs
    row_lens = group.row_lens(layer, host=True)
    for j, i in enumerate(rows):
        segs = kv_segments(kv, tables[i], lens[i], runs[i])
        if row_lens is None or bool((row_lens[i] == lens[i]).all()):
            out[j] = decode_segments(q[i], segs, scale)
        else:
            out[j] = decode_rows(q[i], segs, (lens[i] - row_lens[i]).tolist(), scale)
    return out


def dense_decode(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float,
                 rows: list[int] | None = None, layer: int = 0) -> torch.Tensor:
    """One query per request (or per request in `rows`) over its keys (its rows' in `layer`),
    in one call of the compiled kernel when it is available."""
    if cpu_decode.available() and cpu_decode.supports(q):
        row_lens = group.row_lens(layer)
        if rows is None:
            return cpu_decode.paged_decode_cpu(q, kv.k, kv.v, group.block_table, group.seq_lens, scale,
                                               row_lens=row_lens)
        return cpu_decode.paged_decode_cpu(q[rows], kv.k, kv.v, group.block_table[rows], group.seq_lens[rows], scale,
                                           row_lens=None if row_lens is None else row_lens[rows])
    return dense_decode_torch(q, kv, group, scale, rows, layer)


def decode_pairs(plan: Plan, layer: int) -> torch.Tensor:
    """float64 [num_reqs]: the (query, key) pairs over query heads one decode layer attends,
    each KV head's row length times its query group where rows are shorter than the context."""
    row_lens = plan.group.row_lens(layer)
    if row_lens is None:
        return plan.dense_pairs
    return row_lens.sum(-1).double() * (plan.shape.num_heads // plan.shape.num_kv_heads)


def dense_prefill(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for rows, k, v in request_kv(kv, group):
        out[rows] = prefill_attention(q[rows], k, v, scale)
    return out


@register
class DenseBackend(AttentionBackend):
    name = "dense"
    phases = ("prefill", "decode")
    row_lens = True

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        g = plan.group
        if g.phase == "decode":
            plan.attended += decode_pairs(plan, layer)
            return dense_decode(q, kv, g, plan.scale, layer=layer)
        plan.attended += plan.dense_pairs
        return dense_prefill(q, kv, g, plan.scale)


@register
class DenseTriton(DenseBackend):
    """The block-sparse prefill and page-list decode kernels with every block listed."""

    device = "cuda"

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        from sparsekv.attention.kernels.decode import paged_decode
        from sparsekv.attention.kernels.prefill import paged_prefill

        if plan.group.phase == "decode":
            plan.attended += decode_pairs(plan, layer)
            return paged_decode(q, kv, plan.group, plan.scale, row_lens=plan.group.row_lens(layer))
        plan.attended += plan.dense_pairs
        return paged_prefill(q, kv, plan.group, plan.scale)
