"""Attended (query, key) pairs against dense ones, per phase, in one worker process.

vLLM's engine has no channel for a backend's counters, so each worker rewrites a small JSON
file ($SPARSEKV_VLLM_STATS, `{rank}` in it replaced by the worker's rank) after every step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparsekv.attention.metadata import AttnMetadata


class AttendedStats:
    def __init__(self, path: str, rank: int = 0):
        self.path = Path(path.replace("{rank}", str(rank)))
        self.attended = {"prefill": 0.0, "decode": 0.0}
        self.dense = {"prefill": 0.0, "decode": 0.0}

    def record(self, meta: AttnMetadata, phases: list[str], plans: list, heads_x_layers: int) -> None:
        """Add one step: the plans' device counters are read here, once per step."""
        dense = meta.group("all", 0, meta.num_reqs).causal_pairs_cpu()
        for plan in plans:
            for i, a in enumerate(plan.attended.tolist()):
                self.attended[phases[plan.group.req_start + i]] += a
        for ph, pairs in zip(phases, dense):
            self.dense[ph] += pairs * heads_x_layers
        self.write()

    def fraction(self, phase: str) -> float | None:
        return self.attended[phase] / self.dense[phase] if self.dense[phase] else None

    def write(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({
            "attended_pairs": self.attended, "dense_pairs": self.dense,
            "attended_fraction": {ph: self.fraction(ph) for ph in self.dense}}))
        tmp.replace(self.path)  # readers never see half a file
