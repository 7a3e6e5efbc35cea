"""The attention backend interface and registry.

A backend computes attention for a group of sequences that share a phase (prefill or decode)
and a method configuration. The model's attention layer groups the batch, calls the backend
and scatters the output rows back. Backends import only torch (and their kernels): never the
engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


@dataclass
class LayerKV:
    """One layer's paged KV pool.

    k, v: indexed as [num_pages, num_kv_heads, page_size, head_dim]. `allocate` stores them
    head-major ([Hkv, num_pages, ...] underneath, so `k.transpose(0, 1)` is contiguous): a KV
    head's run of consecutive pages is then one contiguous block, which the CPU paths read in
    place instead of copying (the page bounds too: Quest's scoring is 3-6x faster so). Code
    that indexes or passes strides works with either storage.
    kmin, kmax: [num_pages, num_kv_heads, head_dim] element-wise key bounds per page, kept up to
    date on every write (Quest's metadata), or None when the cache does not track them.
    """

    k: torch.Tensor
    v: torch.Tensor
    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def allocate(cls, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "LayerKV":
        shape = (num_kv_heads, num_pages, page_size, head_dim)
        bshape = (num_kv_heads, num_pages, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1),
                   v=torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1),
                   kmin=torch.full(bshape, float("inf"), dtype=dtype, device=device).transpose(0, 1),
                   kmax=torch.full(bshape, float("-inf"), dtype=dtype, device=device).transpose(0, 1))

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def token_major(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """k, v as [Hkv, num_pages * page_size, D] views of a head-major pool (None otherwise):
        consecutive pages are then one slice, the cheapest read on the decode hot path."""
        if self._flat is None and self.k.transpose(0, 1).is_contiguous() and self.v.transpose(0, 1).is_contiguous():
            hkv, d = self.k.shape[1], self.k.shape[3]
            self._flat = (self.k.transpose(0, 1).view(hkv, -1, d), self.v.transpose(0, 1).view(hkv, -1, d))
        return self._flat


@dataclass
class SeqAttn:
    """One sequence's share of an attention call.

    Its queries are rows [q_start, q_start + q_len) of the q passed to the backend and sit at
    absolute positions [context_len - q_len, context_len): the new tokens are already written to
    the cache, so keys [0, context_len) are readable through block_table (logical page i is
    physical page block_table[i]).
    """

    q_start: int
    q_len: int
    context_len: int
    block_table: torch.Tensor  # int64 [num_logical_pages] (at least ceil(context_len / page_size))
    state: dict[Any, Any] = field(default_factory=dict)  # per-sequence backend state, all layers
    attended: int = 0  # filled by the backend: attended (query, key) pairs summed over query heads
    # (first physical page, pages) of each run of consecutive pool pages, in logical order, or
    # None when unknown: the engine works it out once per step, not once per layer
    page_runs: tuple[tuple[int, int], ...] | None = None

    @property
    def causal_pairs(self) -> int:
        """(query, key) pairs under the causal mask, for one head."""
        start = self.context_len - self.q_len
        return self.q_len * start + self.q_len * (self.q_len + 1) // 2


@dataclass
class AttnBatch:
    phase: str  # "prefill" or "decode" (decode: every seq has q_len == 1)
    layer: int
    num_layers: int
    scale: float
    seqs: list[SeqAttn]


class BackendParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionBackend:
    """Subclass, set `name`, `phases` and `Params`, implement `forward`, then `@register`."""

    name: ClassVar[str]
    phases: ClassVar[tuple[str, ...]]  # subset of ("prefill", "decode")
    Params: ClassVar[type[BackendParams]] = BackendParams

    def __init__(self, params: BackendParams):
        self.params = params

    def forward(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
        """q: [sum(q_len), Hq, D] -> output of the same shape; set seq.attended for each seq."""
        raise NotImplementedError


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str, phase: str) -> type[AttentionBackend]:
    cls = _REGISTRY.get(name)
    if cls is None or phase not in cls.phases:
        known = sorted(n for n, c in _REGISTRY.items() if phase in c.phases)
        raise ValueError(f"unknown {phase} attention method {name!r}; known: {', '.join(known)}")
    return cls


def known_methods(phase: str) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if phase in c.phases)


_INSTANCES: dict[tuple[str, BackendParams], AttentionBackend] = {}


def get_backend(name: str, params: BackendParams) -> AttentionBackend:
    """Backends are stateless apart from their params, so one instance per (name, params)."""
    key = (name, params)
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](params)
    return _INSTANCES[key]
