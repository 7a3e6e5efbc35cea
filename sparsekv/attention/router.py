"""Per-step routing: which backend runs which rows at each layer, with one plan per group.

Requests come in group order (decodes first, then by route). At each layer, neighbours that
share the phase and the layer's (method, params) form one group; a group's plan is made once
per step and shared by every layer that routes the same rows to the same backend.
"""
from __future__ import annotations

from sparsekv.attention.backend import AttnShape, BackendParams, Plan, get_backend
from sparsekv.attention.context import Route
from sparsekv.attention.metadata import AttnMetadata

LayerRoute = tuple[str, BackendParams]  # (method, params) of one layer


def build_routes(meta: AttnMetadata, phases: list[str], per_request: list[list[LayerRoute]],
                 shape: AttnShape, device: str) -> tuple[list[list[Route]], list[Plan]]:
    """per_request[i][layer] -> routes per layer (covering all tokens in order) and every plan."""
    plans: dict[tuple, Plan] = {}
    layers = []
    for layer in range(shape.num_layers):
        routes, i = [], 0
        while i < meta.num_reqs:
            key = (phases[i], per_request[i][layer])
            j = i + 1
            while j < meta.num_reqs and (phases[j], per_request[j][layer]) == key:
                j += 1
            backend = get_backend(*key[1], device=device)
            pk = (id(backend), i, j)
            if pk not in plans:
                plans[pk] = backend.plan(meta.group(key[0], i, j), shape)
            group = plans[pk].group
            routes.append(Route(backend, plans[pk], group.token_start, group.token_end))
            i = j
        layers.append(routes)
    return layers, list(plans.values())
