"""Dense attention over the paged cache: the baseline every sparse method must reproduce.

CPU decode runs the whole group in one call of the compiled paged-decode kernel (reading pages
in place, split-K over 2+ threads); where it cannot be built, the PyTorch path decodes request by
request over in-place segments. Prefill runs SDPA's flash kernel per request. CUDA uses the
Triton kernels with every page listed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttentionBackend, AttnShape, Plan, register
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.paged import decode_segments, gather_kv, kv_segments, prefill_attention
from sparsekv.cache.kv_cache import LayerKV


@dataclass(eq=False)
class DensePlan(Plan):
    pairs: torch.Tensor  # float64 [n]: causal pairs per layer, over query heads


def dense_pairs(group: BatchGroup, shape: AttnShape) -> torch.Tensor:
    return torch.tensor([p * shape.num_heads for p in group.causal_pairs_cpu()], dtype=torch.float64,
                        device=group.meta.seq_lens.device)


def dense_decode_torch(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float,
                       rows: list[int] | None = None) -> torch.Tensor:
    """The PyTorch reference decode for the group's requests (or `rows` of them), one at a time."""
    out = torch.empty_like(q)
    tables, lens, runs = group.block_tables_cpu, group.seq_lens_cpu, group.page_runs
    for i in range(group.num_reqs) if rows is None else rows:
        segs = kv_segments(kv, tables[i], lens[i], runs[i])
        out[i] = decode_segments(q[i], segs, scale)
    return out


def dense_decode(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float) -> torch.Tensor:
    """One query per request over all its keys: the compiled kernel when it is available."""
    if cpu_decode.available() and cpu_decode.supports(q):
        return cpu_decode.paged_decode_cpu(q, kv.k, kv.v, group.block_table, group.seq_lens, scale)
    return dense_decode_torch(q, kv, group, scale)


def dense_prefill(q: torch.Tensor, kv: LayerKV, group: BatchGroup, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for i, (start, n) in enumerate(zip(group.query_start_cpu, group.q_lens_cpu)):
        k, v = gather_kv(kv, group.block_tables_cpu[i], group.seq_lens_cpu[i], group.page_runs[i])
        out[start:start + n] = prefill_attention(q[start:start + n], k, v, scale)
    return out


@register
class DenseBackend(AttentionBackend):
    name = "dense"
    phases = ("prefill", "decode")

    def plan(self, group: BatchGroup, shape: AttnShape) -> DensePlan:
        base = super().plan(group, shape)
        return DensePlan(base.group, shape, base.attended, dense_pairs(group, shape))

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: DensePlan) -> torch.Tensor:
        plan.attended += plan.pairs
        g = plan.group
        if g.phase == "decode":
            return dense_decode(q, kv, g, plan.scale)
        return dense_prefill(q, kv, g, plan.scale)


@register
class DenseTriton(DenseBackend):
    """The block-sparse prefill and page-list decode kernels with every block listed."""

    device = "cuda"

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: DensePlan) -> torch.Tensor:
        from sparsekv.attention.kernels.decode import paged_decode
        from sparsekv.attention.kernels.prefill import paged_prefill

        plan.attended += plan.pairs
        if plan.group.phase == "decode":
            return paged_decode(q, kv, plan.group, plan.scale)
        return paged_prefill(q, kv, plan.group, plan.scale)
