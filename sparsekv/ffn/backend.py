"""The FFN backend interface and registry, routed per request like attention.

An FFN backend gets the layer's gated MLP (fused gate/up weights and the down projection)
and the rows of its group; `plan` runs once per step. Activation sparsity also drops inputs
of the attention projections (q/k/v, o), so the model calls those through `routed_linear`:
the same routes, the backend's `linear` on each one's rows.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from sparsekv.attention.context import get_forward_context, run_routes
from sparsekv.attention.kernels.cpu_ops import silu_mul
from sparsekv.attention.metadata import BatchGroup


class GatedMLP(Protocol):
    gate_up_proj: torch.nn.Linear  # [2 * intermediate, hidden]: gate rows, then up rows
    down_proj: torch.nn.Linear


class FFNBackend:
    name: ClassVar[str]
    device: ClassVar[str] = "cpu"

    def plan(self, group: BatchGroup, spec=None, state=None):
        """Once per step and group; spec is the group's FFNSection, state the engine's SparseFFNState."""
        return group

    def linear(self, x: torch.Tensor, linear: torch.nn.Linear, layer: int, site: str, plan) -> torch.Tensor:
        return linear(x)

    def forward(self, x: torch.Tensor, mlp: GatedMLP, layer: int, plan: BatchGroup) -> torch.Tensor:
        raise NotImplementedError


class DenseFFN(FFNBackend):
    name = "none"

    def forward(self, x: torch.Tensor, mlp: GatedMLP, layer: int, plan: BatchGroup) -> torch.Tensor:
        return mlp.down_proj(silu_mul(mlp.gate_up_proj(x)))


FFN_BACKENDS: dict[str, FFNBackend] = {"none": DenseFFN()}


def routed_ffn(mlp: GatedMLP, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The FFN seam a model layer calls: each route's backend on its rows."""
    routes = get_forward_context().ffn_routes[layer]
    return run_routes(routes, x, lambda r, rows: r.backend.forward(rows, mlp, layer, r.plan))


def routed_linear(linear: torch.nn.Linear, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """An attention projection through the FFN routes (site: "qkv" or "o"), for input sparsity."""
    routes = get_forward_context().ffn_routes[layer]
    return run_routes(routes, x, lambda r, rows: r.backend.linear(rows, linear, layer, site, r.plan))
