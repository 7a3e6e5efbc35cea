"""Dense attention over the paged cache: the baseline every sparse method must reproduce.

CPU decode runs the whole group in one call of the compiled paged-decode kernel (reading pages
in place, split-K over 2+ threads); where it cannot be built, the PyTorch path decodes request by
request over in-place segments. Prefill runs SDPA's flash kernel per request. CUDA uses the
Triton kernels with every page listed.
"""
from __future__ import annotations

import torch

from sparsekv.attention.backend import AttentionBackend, Plan, register
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.paged import decode_segments, kv_segments, prefill_attention, request_kv
from sparsekv.cache.kv_cache import LayerKV


def dense_decode_torch(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float,
                       rows: list[int] | None = None) -> torch.Tensor:
    """The PyTorch reference decode of the group's requests (or `rows` of them), one at a time:
    q holds every request's row; the output has one row per decoded request."""
    rows = range(group.num_reqs) if rows is None else rows
    out = q.new_empty((len(rows), *q.shape[1:]))
    tables, lens, runs = group.block_tables_cpu, group.seq_lens_cpu, group.page_runs
    for j, i in enumerate(rows):
        out[j] = decode_segments(q[i], kv_segments(kv, tables[i], lens[i], runs[i]), scale)
    return out


def dense_decode(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float,
                 rows: list[int] | None = None) -> torch.Tensor:
    """One query per request (or per request in `rows`) over all its keys, in one call of the
    compiled kernel when it is available."""
    if cpu_decode.available() and cpu_decode.supports(q):
        if rows is None:
            return cpu_decode.paged_decode_cpu(q, kv.k, kv.v, group.block_table, group.seq_lens, scale)
        return cpu_decode.paged_decode_cpu(q[rows], kv.k, kv.v, group.block_table[rows], group.seq_lens[rows], scale)
    return dense_decode_torch(q, kv, group, scale, rows)


def dense_prefill(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for rows, k, v in request_kv(kv, group):
        out[rows] = prefill_attention(q[rows], k, v, scale)
    return out


@register
class DenseBackend(AttentionBackend):
    name = "dense"
    phases = ("prefill", "decode")

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        plan.attended += plan.dense_pairs
        g = plan.group
        if g.phase == "decode":
            return dense_decode(q, kv, g, plan.scale)
        return dense_prefill(q, kv, g, plan.scale)


@register
class DenseTriton(DenseBackend):
    """The block-sparse prefill and page-list decode kernels with every block listed."""

    device = "cuda"

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        from sparsekv.attention.kernels.decode import paged_decode
        from sparsekv.attention.kernels.prefill import paged_prefill

        plan.attended += plan.dense_pairs
        if plan.group.phase == "decode":
            return paged_decode(q, kv, plan.group, plan.scale)
        return paged_prefill(q, kv, plan.group, plan.scale)
