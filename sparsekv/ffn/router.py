"""Per-step FFN routes: neighbouring requests with the same phase and FFN config share one plan.

Dense runs where the method is none, the sparsity is 0 (so sparsity 0 is dense exactly), or a
prefill the policy leaves dense. The routes are the same at every layer (thresholds differ
per layer inside the plan).
"""
from __future__ import annotations

from sparsekv.attention.context import Route
from sparsekv.attention.metadata import AttnMetadata
from sparsekv.config import FFNSection
from sparsekv.ffn.backend import FFN_BACKENDS


def route_key(spec: FFNSection, phase: str) -> FFNSection | None:
    """The config a request's rows run with in this phase; None: dense."""
    if spec.method == "none" or spec.sparsity == 0 or (phase == "prefill" and spec.prefill_sparsify_fraction == 0):
        return None
    return spec


def build_ffn_routes(meta: AttnMetadata, phases: list[str], specs: list[FFNSection], state) -> list[Route]:
    """Contiguous runs of requests with one (phase, config); dense rows of either phase share one."""
    def key(i: int) -> tuple:
        spec = route_key(specs[i], phases[i])
        return ("mixed" if spec is None else phases[i], spec)

    routes, i = [], 0
    while i < meta.num_reqs:
        k = key(i)
        j = i + 1
        while j < meta.num_reqs and key(j) == k:
            j += 1
        group = meta.group(k[0], i, j)
        backend = FFN_BACKENDS["none" if k[1] is None else k[1].method]
        routes.append(Route(backend, backend.plan(group, k[1], state), group.token_start, group.token_end))
        i = j
    return routes
