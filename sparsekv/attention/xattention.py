"""XAttention (Xu et al., ICML 2025): block-sparse prefill chosen by strided antidiagonal scores.

Per (query head, query block) the backend keeps the fewest key blocks whose estimated attention
mass reaches `threshold`, plus the sink block and the diagonal block, then runs attention over
those blocks only. Decode stays dense (another method's job). The CPU path here really skips
the unselected blocks; on CUDA the same selection feeds the Triton block-sparse kernel.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from sparsekv.attention.backend import AttentionBackend, BackendParams, Plan, register
from sparsekv.attention.block_sparse import attend_lists, mask_lists, pad_to, query_units, units_to_heads
from sparsekv.attention.paged import prefill_attention, request_kv
from sparsekv.cache.kv_cache import LayerKV
from sparsekv.attention.xattention_select import (
    BlockGeometry, block_scores, causal_blocks, head_thresholds, load_threshold_table, select_blocks)

Threshold = float | str | tuple[tuple[float, ...], ...]


class XAttentionParams(BackendParams):
    block_size: Literal[16, 32, 64, 128] = 128
    stride: Literal[4, 8, 16] = 8
    threshold: Threshold = 0.9  # scalar, [layer][head] table, or a JSON file holding the table
    norm: float = Field(1.0, gt=0.0)
    select_mode: Literal["antidiagonal", "diagonal"] = "antidiagonal"
    gqa_mode: Literal["per_q_head", "group_max"] = "per_q_head"

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: Threshold) -> Threshold:
        table = load_threshold_table(v) if isinstance(v, str) else v
        values = [table] if isinstance(table, float) else [x for row in table for x in row]
        if not values or min(values) < 0 or max(values) > 1:
            raise ValueError("xattention threshold is a fraction of attention mass in [0, 1] "
                             "(a number or a [layer][head] table)")
        return v

    @model_validator(mode="after")
    def _check_stride(self) -> "XAttentionParams":
        if self.block_size % self.stride:
            raise ValueError(f"xattention block_size {self.block_size} is not a multiple of stride {self.stride}")
        return self


@register
class XAttentionBackend(AttentionBackend):
    name = "xattention"
    phases = ("prefill",)
    Params = XAttentionParams

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        p = self.params
        if p.block_size % kv.page_size and kv.page_size % p.block_size:
            raise ValueError(f"xattention block_size {p.block_size} and KV page size {kv.page_size} "
                             "must divide one another")
        return self.attend(q, kv, plan, head_thresholds(p.threshold, layer, q.shape[1]))

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: Plan, taus: torch.Tensor) -> torch.Tensor:
        out, attended = torch.empty_like(q), []
        for rows, k, v in request_kv(kv, plan.group):
            out[rows], pairs = _forward_seq(self.params, taus, q[rows], k, v, k.shape[1], plan.scale)
            attended.append(pairs)
        plan.attended += torch.stack(attended).to(torch.float64)
        return out


def _select(p: XAttentionParams, taus: torch.Tensor, scores: torch.Tensor, geom: BlockGeometry,
            group: int) -> torch.Tensor:
    """Selected blocks per query head [Hq, nqb, nkb]; in group_max mode the union over each GQA group."""
    sel = select_blocks(scores, taus, geom.first_block)
    if p.gqa_mode == "group_max":
        h, nqb, nkb = sel.shape
        sel = sel.view(h // group, group, nqb, nkb).any(1, keepdim=True).expand(-1, group, -1, -1)
        sel = sel.reshape(h, nqb, nkb)
    return sel


def attended_pairs(sel: torch.Tensor, geom: BlockGeometry) -> torch.Tensor:
    """(query, key) pairs computed under a selection [H, nqb, nkb] (diagonal block always in),
    as a 0-d tensor on sel's device (no host sync)."""
    off = sel.sum(-1) - 1
    per_block = off * geom.queries_per_block().to(sel.device) * geom.block_size + geom.diagonal_pairs().to(sel.device)
    return per_block.sum()


def _forward_seq(p: XAttentionParams, taus: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 context_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One request on the CPU: score, select, then attend over the selected blocks only.
    q: [q_len, Hq, D]; k, v: [Hkv, context_len, D]. Returns the output and the attended pairs."""
    q_len, hq = q.shape[0], q.shape[1]
    geom = BlockGeometry(p.block_size, q_len, context_len)
    group = hq // k.shape[0]
    if geom.num_kblocks <= 2 or bool((taus >= 1).all()):
        sel = None  # every causal block is kept: forced blocks cover it, or the dense shortcut
    else:
        bs = p.block_size
        kp = pad_to(k, geom.num_kblocks * bs, 0)
        vp = pad_to(v, geom.num_kblocks * bs, 0)
        qp = pad_to(q.transpose(0, 1), geom.num_qblocks * bs, geom.pad_front)
        with torch.profiler.record_function("xattention.select"):  # reported by `bench attention`
            scores = block_scores(qp, kp, geom, p.stride, p.norm, p.select_mode == "antidiagonal")
            sel = _select(p, taus, scores, geom, group)
        if int(sel.sum()) == int(causal_blocks(geom, hq).sum()):
            sel = None  # nothing to skip: compute exactly what dense attention computes
    if sel is None:
        pairs = q_len * (context_len - q_len) + q_len * (q_len + 1) // 2
        return prefill_attention(q, k, v, scale), torch.tensor(pairs * hq)
    out = block_sparse_attention(qp, kp, vp, sel, geom, scale, shared_group=p.gqa_mode == "group_max")
    return out[:, geom.pad_front:geom.pad_front + q_len].transpose(0, 1), attended_pairs(sel, geom)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor,
                           geom: BlockGeometry, scale: float, shared_group: bool = False) -> torch.Tensor:
    """Causal attention over selected key blocks only, on contiguous padded tensors.

    q: [Hq, nqb*B, D] on the absolute block grid; k, v: [Hkv, nkb*B, D]; sel: bool [Hq, nqb, nkb]
    with each diagonal block set. Work units are (query head, query block), or (KV head, query
    block) with the group's queries stacked when `shared_group` (the group shares one selection).
    """
    hq, hkv, nqb, bs = q.shape[0], k.shape[0], geom.num_qblocks, geom.block_size
    lists, counts, unit_kv = mask_lists(sel, geom, shared_group, hq // hkv)
    out = attend_lists(query_units(q, hkv, nqb, shared_group), k, v, lists, counts, unit_kv, bs, bs, scale)
    return units_to_heads(out, hq, hkv, nqb, shared_group)


@register
class XAttentionTriton(XAttentionBackend):
    """Fused scoring kernel, selection in torch on the GPU, block-sparse paged prefill."""

    device = "cuda"

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: Plan, taus: torch.Tensor) -> torch.Tensor:
        from sparsekv.attention.kernels.prefill import BlockLists, paged_prefill
        from sparsekv.attention.kernels.xattn_score import xattn_block_scores

        p, g = self.params, plan.group
        group = q.shape[1] // kv.k.shape[1]
        with torch.profiler.record_function("xattention.select"):
            scores = xattn_block_scores(q, kv, g, p.block_size, p.stride, p.norm, p.select_mode == "antidiagonal")
            masks, attended = [], []
            for n, ctx, sc in zip(g.q_lens_cpu, g.seq_lens_cpu, scores):
                geom = BlockGeometry(p.block_size, n, ctx)
                masks.append(_select(p, taus.to(sc.device), sc, geom, group))
                attended.append(attended_pairs(masks[-1], geom))
        plan.attended += torch.stack(attended).to(torch.float64)
        return paged_prefill(q, kv, g, plan.scale, BlockLists.from_masks(masks, p.block_size))
