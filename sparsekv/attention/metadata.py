"""Per-step attention metadata, built once by the model runner and read by every layer.

Names follow vLLM v1's CommonAttentionMetadata. The batch is ordered so that each (phase, route)
group is a contiguous slice, decodes first; a backend receives a `BatchGroup` view of its slice.
Device tensors serve kernels; the `_cpu` mirrors serve planning on the host, so nothing in a
layer's forward has to copy device data back (no host-device sync per layer on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch


def page_runs(pages: list[int]) -> tuple[tuple[int, int], ...]:
    """(first page, length) of each run of consecutive pages, in order."""
    runs, start, n = [], pages[0], 1
    for p in pages[1:]:
        if p == start + n:
            n += 1
        else:
            runs.append((start, n))
            start, n = p, 1
    runs.append((start, n))
    return tuple(runs)


@dataclass(frozen=True)
class RequestInput:
    """One request's share of a step: q_len new tokens ending at position context_len."""

    q_len: int
    context_len: int
    block_table: list[int]
    phase: str = "prefill"  # "decode": one generated token (q_len 1); "prefill": prompt tokens
    slot: int = 0  # the request's slot in backend-owned per-request state
    rope_len: int = 0  # sequence length that length-dependent rope (dynamic NTK) sees; 0: context_len
    # int [num_layers, Hkv]: KV slots each (layer, KV head) row reads, the last ones before
    # context_len (eviction with per-layer or per-head budgets); None: every row reads them all
    row_lens: torch.Tensor | None = None


@dataclass(eq=False)
class BatchGroup:
    """Requests [req_start, req_end) of the step, tokens [token_start, token_end), one phase.

    A backend's q rows are the group's tokens, in order: request i's queries are rows
    query_start_cpu[i] .. + q_lens_cpu[i] of the q it is given.
    """

    meta: "AttnMetadata"
    phase: str  # "prefill" or "decode" (decode: every q_len is 1)
    req_start: int
    req_end: int
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Step-scoped derived data (kernel tile metadata, ...): built on the first layer, reused."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def num_reqs(self) -> int:
        return self.req_end - self.req_start

    @cached_property
    def token_start(self) -> int:
        return self.meta.query_start_loc_cpu[self.req_start]

    @cached_property
    def token_end(self) -> int:
        return self.meta.query_start_loc_cpu[self.req_end]

    @cached_property
    def query_start_cpu(self) -> list[int]:
        return [x - self.token_start for x in self.meta.query_start_loc_cpu[self.req_start:self.req_end]]

    @property
    def q_lens_cpu(self) -> list[int]:
        return self.meta.q_lens_cpu[self.req_start:self.req_end]

    @property
    def seq_lens_cpu(self) -> list[int]:
        return self.meta.seq_lens_cpu[self.req_start:self.req_end]

    @property
    def slots_cpu(self) -> list[int]:
        return self.meta.req_slots_cpu[self.req_start:self.req_end]

    @property
    def block_tables_cpu(self) -> list[torch.Tensor]:
        """int64 page ids per request, covering at least its context, on the host."""
        return self.meta.block_tables_cpu[self.req_start:self.req_end]

    @property
    def page_runs(self) -> list[tuple[tuple[int, int], ...]]:
        return self.meta.page_runs[self.req_start:self.req_end]

    # device tensors for kernels: views of the step's tensors
    @cached_property
    def block_table(self) -> torch.Tensor:
        """int32 [n, max_pages] on the device, 0-padded."""
        return self.meta.block_table_tensor[self.req_start:self.req_end]

    @cached_property
    def seq_lens(self) -> torch.Tensor:
        return self.meta.seq_lens[self.req_start:self.req_end]

    @cached_property
    def query_start(self) -> torch.Tensor:
        """int32 [n] first q row of each request, relative to the group."""
        loc = self.meta.query_start_loc
        return loc[self.req_start:self.req_end] - loc[self.req_start]

    @cached_property
    def q_lens(self) -> torch.Tensor:
        loc = self.meta.query_start_loc
        return loc[self.req_start + 1:self.req_end + 1] - loc[self.req_start:self.req_end]

    def row_lens(self, layer: int, host: bool = False) -> torch.Tensor | None:
        """int32 [n, Hkv] (device, or host mirror): the KV slots each KV head of each request
        reads in `layer`, the last ones of its context; None: every row reads its whole context."""
        t = self.meta.row_lens_cpu if host else self.meta.row_lens
        return None if t is None else t[layer, self.req_start:self.req_end]

    def causal_pairs_cpu(self) -> list[int]:
        """(query, key) pairs under the causal mask per request, for one head."""
        return [q * (c - q) + q * (q + 1) // 2 for q, c in zip(self.q_lens_cpu, self.seq_lens_cpu)]


@dataclass(eq=False)
class AttnMetadata:
    num_reqs: int
    num_decodes: int  # requests [0, num_decodes) decode one token each
    num_actual_tokens: int
    page_size: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], device
    query_start_loc_cpu: list[int]
    seq_lens: torch.Tensor  # int32 [num_reqs]: context length after this step, device
    seq_lens_cpu: list[int]
    block_table_tensor: torch.Tensor  # int32 [num_reqs, max_pages], device
    block_tables_cpu: list[torch.Tensor]
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]: page * page_size + offset per new token
    req_slots_cpu: list[int]
    page_runs: list[tuple[tuple[int, int], ...]]
    rope_lens_cpu: list[int]
    row_lens: torch.Tensor | None = None  # int32 [num_layers, num_reqs, Hkv] (RequestInput.row_lens), device
    row_lens_cpu: torch.Tensor | None = None

    @cached_property
    def q_lens_cpu(self) -> list[int]:
        loc = self.query_start_loc_cpu
        return [b - a for a, b in zip(loc, loc[1:])]

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @classmethod
    def build(cls, reqs: list[RequestInput], page_size: int, device: torch.device) -> "AttnMetadata":
        """From requests already in group order (decodes first)."""
        loc, slots, tables, runs = [0], [], [], []
        num_decodes = 0
        for r in reqs:
            loc.append(loc[-1] + r.q_len)
            used = r.block_table[:-(-r.context_len // page_size)]
            tables.append(torch.tensor(used, dtype=torch.long))
            runs.append(page_runs(used))
            for pos in range(r.context_len - r.q_len, r.context_len):
                slots.append(used[pos // page_size] * page_size + pos % page_size)
            num_decodes += r.phase == "decode"
        width = max(len(t) for t in tables)
        bt = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        seq_lens = [r.context_len for r in reqs]
        rows = row_table(reqs)
        return cls(
            num_reqs=len(reqs), num_decodes=num_decodes, num_actual_tokens=loc[-1], page_size=page_size,
            query_start_loc=torch.tensor(loc, dtype=torch.int32).to(device), query_start_loc_cpu=loc,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device), seq_lens_cpu=seq_lens,
            block_table_tensor=bt.to(device), block_tables_cpu=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(device),
            req_slots_cpu=[r.slot for r in reqs], page_runs=runs,
            rope_lens_cpu=[r.rope_len or r.context_len for r in reqs],
            row_lens=None if rows is None else rows.to(device), row_lens_cpu=rows)

    def group(self, phase: str, req_start: int, req_end: int) -> BatchGroup:
        return BatchGroup(self, phase, req_start, req_end)


def row_table(reqs: list[RequestInput]) -> torch.Tensor | None:
    """int32 [num_layers, num_reqs, Hkv] of the requests' row lengths (whole contexts where a
    request has none); None when no request has any, so dense steps build nothing."""
    given = [r.row_lens for r in reqs if r.row_lens is not None]
    if not given:
        return None
    shape = given[0].shape
    return torch.stack([torch.full(shape, r.context_len) if r.row_lens is None else r.row_lens
                        for r in reqs], 1).to(torch.int32)
