"""The FFN backend interface and registry, routed per request like attention.

An FFN backend gets the layer's gated MLP (fused gate/up weights and the down projection)
and the rows of its group; `plan` runs once per step. Dense is the only method until the
activation-sparse FFN lands; the model already calls through this seam.
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

    def plan(self, group: BatchGroup) -> BatchGroup:
        return group

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
