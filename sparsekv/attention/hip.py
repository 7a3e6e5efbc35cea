"""HiP attention (ICLR'25) and InfiniteHiP: training-free hierarchical pruning, prefill and decode.

Prefill: each query block searches its middle keys (hip_search) and attends sink + kept blocks +
window through the shared block-sparse path (block_sparse.attend_lists on the CPU, the paged
Triton prefill kernel with small key blocks on CUDA). Decode: a refresh searches whole KV pages
with the last refresh_interval[-1] decode queries (the paper's prefix-query buffer) of a KV
group's heads as the query block, one list per KV head; the result is cached
per request slot and layer and reused for the next steps (stage i of InfiniteHiP reruns every
refresh_interval[i] steps from the cached output of stage i - 1); tokens generated since are
inside the sliding window. Decode attention reads the listed pages with the page-list kernels.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from sparsekv.attention.backend import AttentionBackend, AttnShape, Plan, register
from sparsekv.attention.block_sparse import attend_lists, pad_to, query_units, units_to_heads
from sparsekv.attention.hip_plan import HiPParams, decode_pages, middle_blocks, prefill_lists, search
from sparsekv.attention.hip_search import Probe, cpu_probe
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.page_select import decode_pages as attend_pages, decode_pages_triton
from sparsekv.attention.paged import gather_kv, prefill_attention, request_kv
from sparsekv.attention.xattention_select import BlockGeometry
from sparsekv.cache.kv_cache import LayerKV


@dataclass
class LayerMask:
    """One layer's decode mask: the kept middle blocks [Hkv, n], the stage outputs they came
    from, and the page lists [Hkv, m] attended until the next refresh."""

    kept: torch.Tensor
    stages: list
    pages: torch.Tensor


@dataclass
class SlotState:
    """A request's decode masks: steps since its first refresh, the context then, and a
    LayerMask per layer. `step_meta` and `refresh` remember this step's decision, so plans of
    several groups in one step advance it once."""

    step: int = 0
    refreshed_len: int = 0
    layers: dict[int, LayerMask] = field(default_factory=dict)
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per layer, the last decode queries
    step_meta: weakref.ref | None = None
    refresh: int | None = None


@dataclass(eq=False)
class HiPPlan(Plan):
    refresh: list[int | None] = field(default_factory=list)  # decode: first stage to rerun, None: reuse


@register
class HiPBackend(AttentionBackend):
    name = "hip"
    phases = ("prefill", "decode")
    Params = HiPParams

    def __init__(self, params: HiPParams):
        super().__init__(params)
        self.slots: dict[int, SlotState] = {}

    def free(self, slots: list[int]) -> None:
        for s in slots:
            self.slots.pop(s, None)

    def plan(self, group: BatchGroup, shape: AttnShape) -> HiPPlan:
        base = super().plan(group, shape)
        plan = HiPPlan(base.group, shape, base.attended)
        if group.phase == "decode":
            plan.refresh = [self._advance(s, n, group.meta) for s, n in zip(group.slots_cpu, group.seq_lens_cpu)]
        return plan

    def _advance(self, slot: int, context_len: int, meta: object) -> int | None:
        """This step's refresh for the slot: the first stage whose interval divides the step."""
        st, intervals = self.slots.get(slot), self.params.refresh_interval
        if st is not None and st.step_meta is not None and st.step_meta() is meta:
            return st.refresh
        if st is None or not st.refreshed_len <= context_len <= st.refreshed_len + intervals[0]:
            st = self.slots[slot] = SlotState(0, context_len - 1)  # new, reused slot or stale: start over
        step, st.step, st.step_meta = st.step, st.step + 1, weakref.ref(meta)
        if step % intervals[0] == 0:
            st.refreshed_len = context_len
        st.refresh = next((i for i, n in enumerate(intervals) if step % n == 0), None)
        return st.refresh

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: HiPPlan) -> torch.Tensor:
        if plan.group.phase == "decode":
            return self.decode(q, kv, layer, plan)
        return self.prefill(q, kv, plan)

    def prefill(self, q: torch.Tensor, kv: LayerKV, plan: Plan) -> torch.Tensor:
        out, attended = torch.empty_like(q), []
        for rows, k, v in request_kv(kv, plan.group):
            out[rows], pairs = self._prefill_seq(q[rows], k, v, plan.scale)
            attended.append(pairs)
        plan.attended += torch.stack(attended).to(torch.float64)
        return out

    def _prefill_seq(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        p, (q_len, hq, _), (hkv, ctx, _) = self.params, q.shape, k.shape
        geom = BlockGeometry(p.block_size_q, q_len, ctx)
        if self.dense_prefill(geom):
            pairs = q_len * (ctx - q_len) + q_len * (q_len + 1) // 2
            return prefill_attention(q, k, v, scale), torch.tensor(pairs * hq)
        bq, shared = p.block_size_q, p.gqa_mode == "group_max"
        kp, vp = pad_to(k, geom.num_kblocks * bq, 0), pad_to(v, geom.num_kblocks * bq, 0)
        qp = pad_to(q.transpose(0, 1), geom.num_qblocks * bq, geom.pad_front)
        with torch.profiler.record_function("hip.select"):  # reported by `bench attention`
            lists, counts, unit_kv, pairs = prefill_lists(p, q, geom, hkv, lambda qs, ukv: cpu_probe(qs, kp, ukv))
        units = query_units(qp, hkv, geom.num_qblocks, shared)
        out = attend_lists(units, kp, vp, lists, counts, unit_kv, p.block_size_k, bq, scale)
        out = units_to_heads(out, hq, hkv, geom.num_qblocks, shared)
        return out[:, geom.pad_front:geom.pad_front + q_len].transpose(0, 1), pairs

    def dense_prefill(self, geom: BlockGeometry) -> bool:
        """Short prompts, or every query block's middle keys fit the budget (exactly dense)."""
        p = self.params
        middle = (geom.num_kblocks - 1) * p.block_size_q - p.sliding_window - p.sink
        return geom.context_len <= p.prefill_dense_threshold or p.fits(middle)

    def decode(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: HiPPlan) -> torch.Tensor:
        p, g = self.params, plan.group
        block = max(p.block_size_k, kv.page_size)
        pages: list[torch.Tensor | None] = [None] * g.num_reqs
        with torch.profiler.record_function("hip.select"):
            for i, (slot, n) in enumerate(zip(g.slots_cpu, g.seq_lens_cpu)):
                lo, hi = middle_blocks(p, n, block)
                if p.fits((hi - lo) * block):
                    continue
                st = self.slots[slot]
                recent = st.queries.setdefault(layer, [])
                recent.append(q[i].clone())  # the prefix-query buffer: the last few decode queries
                del recent[:-p.refresh_interval[-1]]
                start = plan.refresh[i] if layer in st.layers else 0
                if start is not None:
                    st.layers[layer] = self._refresh(kv, g, i, layer, st, start, torch.stack(recent), block)
                pages[i] = st.layers[layer].pages
        return self.attend(q, kv, plan, pages)

    def _refresh(self, kv: LayerKV, g: BatchGroup, i: int, layer: int, st: SlotState, start: int,
                 recent: torch.Tensor, block: int) -> LayerMask:
        """Search request i's middle pages from stage `start` on, each KV head's query block being
        its group's heads over the buffered queries recent [n, Hq, D]."""
        p, n, hkv = self.params, g.seq_lens_cpu[i], kv.k.shape[1]
        lo, hi = middle_blocks(p, n, block)
        qs = recent.view(recent.shape[0], hkv, -1, recent.shape[-1]).transpose(0, 1).reshape(hkv, -1, recent.shape[-1])
        bounds = torch.full((hkv,), lo, device=qs.device), torch.full((hkv,), hi, device=qs.device)
        cached = st.layers[layer].stages if layer in st.layers else None
        kept, stages = search(p, self.decode_probe(qs, kv, g, i), *bounds, block, start, cached)
        until = n + p.refresh_interval[-1] - 1  # the last stage reruns every that many steps
        return LayerMask(kept, stages, decode_pages(p, kept, n, block, kv.page_size, until))

    def decode_probe(self, qs: torch.Tensor, kv: LayerKV, group: BatchGroup, i: int) -> Probe:
        k, _ = gather_kv(kv, group.block_tables_cpu[i], group.seq_lens_cpu[i], group.page_runs[i])
        return cpu_probe(qs, k, torch.arange(qs.shape[0]))

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: Plan, pages: list) -> torch.Tensor:
        return attend_pages(q, kv, plan, pages)


@register
class HiPTriton(HiPBackend):
    """The Triton probe kernel for the search and the paged block-sparse / page-list kernels."""

    device = "cuda"

    def prefill(self, q: torch.Tensor, kv: LayerKV, plan: Plan) -> torch.Tensor:
        from sparsekv.attention.kernels.hip_probe import paged_probe
        from sparsekv.attention.kernels.prefill import BlockLists, paged_prefill

        p, g = self.params, plan.group
        hq, hkv = q.shape[1], kv.k.shape[1]
        geoms = [BlockGeometry(p.block_size_q, n, ctx) for n, ctx in zip(g.q_lens_cpu, g.seq_lens_cpu)]
        if all(self.dense_prefill(x) for x in geoms):
            plan.attended += plan.dense_pairs
            return paged_prefill(q, kv, g, plan.scale)
        rows, attended = [], []
        ratio = p.block_size_q // p.block_size_k
        with torch.profiler.record_function("hip.select"):
            for i, geom in enumerate(geoms):
                qi = q[g.query_start_cpu[i]:g.query_start_cpu[i] + g.q_lens_cpu[i]]
                if self.dense_prefill(geom):  # every causal block listed
                    lists = torch.arange(geom.num_kblocks * ratio, device=q.device).expand(hq * geom.num_qblocks, -1)
                    last = (geom.first_block + torch.arange(geom.num_qblocks, device=q.device) + 1) * ratio
                    counts, pairs = last.repeat(hq), torch.tensor(g.causal_pairs_cpu()[i] * hq, device=q.device)
                else:
                    lists, counts, _, pairs = prefill_lists(p, qi, geom, hkv,
                                                            lambda qs, ukv: paged_probe(qs, kv, g.block_table[i], ukv))
                    if p.gqa_mode == "group_max":  # the kernel reads one list per query head
                        units = lists.view(hkv, geom.num_qblocks, -1)
                        lists = units.repeat_interleave(hq // hkv, 0).flatten(0, 1)
                        counts = counts.view(hkv, -1).repeat_interleave(hq // hkv, 0).flatten()
                rows.append((lists, counts))
                attended.append(pairs)
            indices = torch.cat([ls[torch.arange(ls.shape[1], device=q.device) < c.view(-1, 1)] for ls, c in rows])
            counts = torch.cat([c for _, c in rows])
            indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=q.device)
            indptr[1:] = counts.cumsum(0)
            sizes = torch.tensor([0] + [c.numel() for _, c in rows[:-1]], device=q.device)
            lists = BlockLists(p.block_size_q, indptr, indices.to(torch.int32), sizes.cumsum(0).to(torch.int32),
                               p.block_size_k)
        plan.attended += torch.stack(attended).to(torch.float64)
        return paged_prefill(q, kv, g, plan.scale, lists)

    def decode_probe(self, qs: torch.Tensor, kv: LayerKV, group: BatchGroup, i: int) -> Probe:
        from sparsekv.attention.kernels.hip_probe import paged_probe

        return paged_probe(qs, kv, group.block_table[i], torch.arange(qs.shape[0], device=qs.device))

    def attend(self, q: torch.Tensor, kv: LayerKV, plan: Plan, pages: list) -> torch.Tensor:
        return decode_pages_triton(q, kv, plan, pages)
