"""The attention backend interface and its registry (one implementation per method and device).

A backend `plan`s once per step for a group of requests that share a phase and a method
configuration (table packing, tile metadata, buffers), then `forward`s per layer on tensors only.
State that spans steps lives in backend-owned structures keyed by request slot and is released
by `free(slots)`, which the engine calls on finish, abort and preemption. Backends import only
torch, the cache's tensors and their kernels: never the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from sparsekv.attention.metadata import BatchGroup
from sparsekv.cache.kv_cache import KVSpec, LayerKV


@dataclass(frozen=True)
class AttnShape:
    """The model's attention geometry, the same for every layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


@dataclass(eq=False)
class Plan:
    """One group's step plan. `attended` accumulates the (query, key) pairs each request
    attended, summed over query heads and layers, as a device tensor the runner reads once
    per step."""

    group: BatchGroup
    shape: AttnShape
    attended: torch.Tensor  # float64 [num_reqs]

    @property
    def scale(self) -> float:
        return self.shape.scale

    @cached_property
    def dense_pairs(self) -> torch.Tensor:
        """float64 [num_reqs]: the causal pairs over query heads one layer of dense attention
        attends, built once per step on the device."""
        pairs = [p * self.shape.num_heads for p in self.group.causal_pairs_cpu()]
        return torch.tensor(pairs, dtype=torch.float64, device=self.attended.device)


class BackendParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_model(self, shape: AttnShape) -> None:
        """Raise ValueError where the params do not fit the model (e.g. a layer it lacks)."""


class AttentionBackend:
    """Subclass, set `name`, `device`, `phases`, `Params` (and `kv_spec`), implement
    `plan` and `forward`, then `@register`."""

    name: ClassVar[str]
    device: ClassVar[str] = "cpu"  # "cpu" (PyTorch/compiled CPU code) or "cuda" (Triton)
    phases: ClassVar[tuple[str, ...]]  # subset of ("prefill", "decode")
    Params: ClassVar[type[BackendParams]] = BackendParams
    kv_spec: ClassVar[tuple[KVSpec, ...]] = ()  # side tables this backend reads from the KV cache
    # decode reads per-row lengths (BatchGroup.row_lens): with False, eviction keeps every
    # (layer, KV head) row of a request at its longest row's length, so each reads its context
    row_lens: ClassVar[bool] = False

    def __init__(self, params: BackendParams):
        self.params = params

    def plan(self, group: BatchGroup, shape: AttnShape) -> Plan:
        return Plan(group, shape, torch.zeros(group.num_reqs, dtype=torch.float64,
                                              device=group.meta.seq_lens.device))

    def forward(self, q: torch.Tensor, kv: LayerKV, layer: int, plan: Plan) -> torch.Tensor:
        """q: the group's rows [tokens, Hq, D] -> attention output of the same shape."""
        raise NotImplementedError

    def free(self, slots: list[int]) -> None:
        """Release per-request state of these slots (finish, abort or preemption)."""


_REGISTRY: dict[tuple[str, str], type[AttentionBackend]] = {}


def register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[(cls.name, cls.device)] = cls
    return cls


def known_methods(phase: str) -> list[str]:
    return sorted({n for (n, _), c in _REGISTRY.items() if phase in c.phases})


def params_class(name: str, phase: str) -> type[BackendParams]:
    """The method's parameter model (shared by its implementations on every device)."""
    for (n, _), cls in _REGISTRY.items():
        if n == name and phase in cls.phases:
            return cls.Params
    raise ValueError(f"unknown {phase} attention method {name!r}; known: {', '.join(known_methods(phase))}")


def backend_class(name: str, device: str) -> type[AttentionBackend]:
    cls = _REGISTRY.get((name, device))
    if cls is None:
        have = sorted(d for n, d in _REGISTRY if n == name)
        if not have:
            raise ValueError(f"unknown attention method {name!r}; known: {', '.join(sorted({n for n, _ in _REGISTRY}))}")
        raise ValueError(f"attention method {name!r} has no implementation for device {device!r} "
                         f"(it has: {', '.join(have)})")
    return cls


_INSTANCES: dict[tuple[str, str, BackendParams], AttentionBackend] = {}


def get_backend(name: str, params: BackendParams, device: str = "cpu") -> AttentionBackend:
    """One instance per (method, device, params): per-step data lives in plans, per-request
    state in the instance, keyed by slot."""
    key = (name, device, params)
    if key not in _INSTANCES:
        _INSTANCES[key] = backend_class(name, device)(params)
    return _INSTANCES[key]


def live_backends() -> list[AttentionBackend]:
    return list(_INSTANCES.values())
