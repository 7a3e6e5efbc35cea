"""Token eviction on the paged pool: per-request state by slot, scores from each layer's queries,
and the selection and compaction after a step.

The model runner tells the evictor which requests of a step evict (`begin_step`); every
attention layer hands it the step's roped queries after storing the new K/V (`observe`), so
scores come from the step's own queries without keeping them: H2O adds each query's softmax
mass per key; the SnapKV family keeps only the observation window's queries until the prompt
ends, scores the prefix there and drops them. After the forward, `finish_step` picks each
(layer, KV head)'s kept tokens and compacts them into the first slots of the sequence, so the
pages past them can go back to the pool. One page id holds a slot of every layer and KV head,
so the sequence holds the pages of its longest row; a row with a smaller budget (PyramidKV's
layers, AdaKV's heads) keeps its tokens right-aligned below that length, and decode reads only
its own row length (`row_lens`), where the decode backend can (AttentionBackend.row_lens) and
the method evicts once (the SnapKV family: the rows then grow together, one token a step).
Otherwise every row keeps the largest of the method's budgets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparsekv.attention.mustafar import materialise, request_kv
from sparsekv.attention.paged import gather_kv
from sparsekv.cache.compressed import CompressedKVCache, CompressedLayerKV
from sparsekv.cache.kv_cache import KVCache, LayerKV
from sparsekv.evict.compact import compact, compact_compressed, copy_pages, targets
from sparsekv.evict.params import EvictParams, H2OParams, StreamingLLMParams
from sparsekv.evict.scores import attention_mass, reduce_heads, window_scores


@dataclass(eq=False)
class EvictEntry:
    """One evicting request's share of a step."""

    key: Any  # the engine's sequence, handed back with the result
    slot: int
    rows: slice  # its query rows in the step
    kv_len: int  # KV slots after the step's tokens are stored
    block_table: list[int]
    prompt_len: int
    true_len: int  # tokens computed after the step (kv_len plus those evicted)
    params: EvictParams
    capacity: int
    per_row: bool = False  # the decode backend reads per-row lengths: rows may keep their own budgets

    @property
    def num_rows(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def first_row_kv(self) -> int:
        return self.kv_len - self.num_rows

    @property
    def prompt_done(self) -> bool:
        return self.true_len >= self.prompt_len


@dataclass(eq=False)
class SlotState:
    pos: torch.Tensor  # int64 [L, Hkv, cap]: each KV slot's position in the sequence
    score: torch.Tensor  # float32 [L, Hkv, cap]: H2O's accumulated mass / SnapKV's pooled scores
    window_q: list[list[torch.Tensor]] = field(default_factory=list)
    budgets: torch.Tensor | None = None  # int64 [L, Hkv]: the last eviction's per-row budgets
    starts: torch.Tensor | None = None  # int64 [L, Hkv] on the host: each row's first kept slot (None: all 0)
    known: int = 0  # KV slots whose positions are set (prefix-cache hits arrive without a step)
    done: bool = False  # a one-shot method has evicted (or had nothing to evict)


class Evictor:
    def __init__(self, num_layers: int, num_kv_heads: int, scale: float, device: torch.device):
        self.num_layers, self.num_kv_heads, self.scale, self.device = num_layers, num_kv_heads, scale, device
        self.states: dict[int, SlotState] = {}
        self.entries: list[EvictEntry] = []

    def _state(self, e: EvictEntry) -> SlotState:
        st = self.states.get(e.slot)
        cap = 0 if st is None else st.pos.shape[-1]
        if cap < e.kv_len:
            size = (self.num_layers, self.num_kv_heads, max(2 * cap, e.kv_len, 64))
            pos = torch.zeros(size, dtype=torch.long, device=self.device)
            score = torch.zeros(size, dtype=torch.float32, device=self.device)
            if st is not None:
                pos[..., :cap], score[..., :cap] = st.pos, st.score
                st.pos, st.score = pos, score
            else:
                st = self.states[e.slot] = SlotState(pos, score, [[] for _ in range(self.num_layers)])
        return st

    def begin_step(self, entries: list[EvictEntry]) -> None:
        """New KV slots get their true positions and zero scores (a slot's memory is reused)."""
        self.entries = entries
        for e in entries:
            st = self._state(e)
            lo, shift = st.known, e.true_len - e.kv_len
            st.pos[..., lo:e.kv_len] = torch.arange(lo + shift, e.kv_len + shift, device=self.device)
            st.score[..., lo:e.kv_len] = 0
            st.known = e.kv_len

    def observe(self, layer: int, q: torch.Tensor, kv: LayerKV) -> None:
        for e in self.entries:
            st = self.states[e.slot]
            if isinstance(e.params, H2OParams):
                k = _keys(kv, e)
                mass = attention_mass(q[e.rows], k, self.scale, e.first_row_kv)
                st.score[layer, :, :e.kv_len] += reduce_heads(mass, self.num_kv_heads, "sum")
            elif e.params.one_shot and not st.done:
                start = max(0, e.prompt_len - e.params.window - (e.true_len - e.num_rows))
                rows = q[e.rows][start:]
                if rows.shape[0]:
                    st.window_q[layer].append(rows.clone())
                if e.prompt_done:
                    k = _keys(kv, e)
                    qw = torch.cat(st.window_q[layer])
                    st.score[layer, :, :e.kv_len] = window_scores(qw, k, self.scale, e.params)
                    st.window_q[layer] = []

    def finish_step(self, cache: KVCache, private: Callable[[Any, list[int]], list[tuple[int, int]] | None],
                    shared: Callable[[Any], int]) -> list[tuple[Any, int, int | None]]:
        """Evict where a request is over its budget: (key, KV slots kept, first page written).

        Pages the compaction writes that another sequence holds (a shared cached prompt) are
        copied first: private(key, logical pages) swaps them for fresh ones and returns the
        (old, new) pairs to copy. When the pool cannot spare those pages, the shared(key)
        leading tokens are kept in place instead, so nothing shared is ever written.
        """
        out = []
        for e in self.entries:
            st = self.states[e.slot]
            if e.params.one_shot:
                if st.done or not e.prompt_done:
                    continue
                st.done = True
            elif not e.prompt_done:
                continue
            picked = self._select(e, st, 0)
            if picked is None:
                continue
            swaps = private(e.key, written_pages(*picked, cache.page_size, len(e.block_table)))
            if swaps is None:
                picked = self._select(e, st, shared(e.key))
                if picked is None:
                    continue
            keep, n, starts = picked
            st.known = n
            if isinstance(cache, CompressedKVCache):  # no prefix cache over it: nothing is shared
                first = compact_compressed(cache, e.slot, e.block_table, keep, n, (st.pos, st.score))
            else:
                copy_pages(cache, swaps or [])
                first = compact(cache, e.block_table, keep, n, (st.pos, st.score), starts)
            if starts is not None:  # slots below a row's start hold no token of it
                dead = torch.arange(n, device=self.device) < starts.unsqueeze(-1)
                st.pos[..., :n].masked_fill_(dead, -1)
                st.score[..., :n].masked_fill_(dead, 0)
            st.starts = None if starts is None else starts.cpu()  # read on the host every step: copied once
            out.append((e.key, n, first))
        self.entries = []
        return out

    def _select(self, e: EvictEntry, st: SlotState, pinned: int
                ) -> tuple[torch.Tensor, int, torch.Tensor | None] | None:
        """The kept mask [L, Hkv, K], the longest row's count n and each row's start (it keeps
        n - start; None: every row keeps n); None: nothing to evict. The first `pinned` slots
        are kept where they are (every row then keeps n)."""
        K, p = e.kv_len, e.params
        if K <= e.capacity:
            return None
        pos = st.pos[..., :K]
        recent = p.protected_recent(e.capacity)
        protected = (pos < p.n_sink) | (pos >= e.true_len - recent)
        protected[..., :pinned] = True
        score = pos.float() if isinstance(p, StreamingLLMParams) else st.score[..., :K]
        n_prot = int(protected.sum(-1).max())
        budgets = p.row_budgets(e.capacity, score, ~protected, n_prot).clamp(max=K)
        st.budgets = budgets
        n = max(int(budgets.max()), n_prot)
        if n >= K:
            return None
        top = score.masked_fill(protected, float("inf")).topk(n, dim=-1).indices  # best first
        if not (e.per_row and p.one_shot and pinned == 0) or bool((budgets >= n).all()):
            return torch.zeros_like(protected).scatter_(-1, top, True), n, None
        kept = budgets.clamp(min=n_prot).to(top.device)  # the protected, inf-scored, come first
        rank = torch.arange(n, device=top.device) < kept.unsqueeze(-1)
        return torch.zeros_like(protected).scatter_(-1, top, rank), n, n - kept

    def row_lens(self, slot: int, kv_len: int) -> torch.Tensor | None:
        """int [L, Hkv]: KV slots each row of the request reads (the last of its kv_len), None
        where every row reads them all."""
        st = self.states.get(slot)
        return None if st is None or st.starts is None else kv_len - st.starts

    def unread_slots(self, slot: int) -> float:
        """Mean over rows of the KV slots the request holds below its rows' starts (PyramidKV and
        AdaKV rows shorter than the longest): held in pages, never read."""
        st = self.states.get(slot)
        return 0.0 if st is None or st.starts is None else float(st.starts.double().mean())

    def free(self, slots: list[int]) -> None:
        for s in slots:
            self.states.pop(s, None)


def _keys(kv: LayerKV, e: EvictEntry) -> torch.Tensor:
    """The request's keys [Hkv, kv_len, D] as this step's attention read them: over a Mustafar
    cache pruned where compressed before the step (this step's are compressed after it)."""
    table = torch.tensor(e.block_table)
    if isinstance(kv, CompressedLayerKV):
        return materialise(request_kv(kv, table, e.kv_len, kv.layout.compressed_len(e.first_row_kv)))[0]
    return gather_kv(kv, table, e.kv_len)[0]


def written_pages(keep: torch.Tensor, n: int, starts: torch.Tensor | None, page_size: int,
                  num_pages: int) -> list[int]:
    """Logical pages compaction writes (those with a hole in a row's target) and the next
    token's page."""
    holes = targets(keep, n, starts)[0].flatten(0, 1).any(0).nonzero().flatten()
    pages = set((holes // page_size).tolist())
    if n // page_size < num_pages:
        pages.add(n // page_size)
    return sorted(pages)
