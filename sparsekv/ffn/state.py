"""One engine's activation-sparsity state: its model's thresholds and the rules built from them.

Rules (threshold vectors, column norms, Wᵀ copies) are built once per FFN config and reused by
every step; the server's own config is built at load, a request's other config on first use.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekv.ffn.thresholds import FFNThresholds, ThresholdsError


class SparseFFNState:
    def __init__(self, model: nn.Module, thresholds: FFNThresholds | None, device: torch.device):
        self.model, self.thresholds, self.device = model, thresholds, device
        self.args = model.args
        self._rules: dict = {}

    def linears(self, layer: int) -> dict[str, nn.Linear]:
        block = self.model.model.layers[layer]
        return {"qkv": block.self_attn.qkv_proj, "o": block.self_attn.o_proj,
                "gate_up": block.mlp.gate_up_proj, "down": block.mlp.down_proj}

    def calibrated(self, what: str) -> FFNThresholds:
        if self.thresholds is None:
            raise ThresholdsError(f"{what} needs calibrated thresholds and none were found for this model: run "
                                  "`sparsekv calibrate --method ... --model M --output FILE` and pass "
                                  "--ffn-thresholds FILE (or put the file next to the model)")
        return self.thresholds

    def full(self, value: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(value), dtype=torch.float32, device=self.device)

    def install(self, backend, spec, rules: list | None) -> None:
        """Rules chosen from outside for one config (greedy calibration's trials); None: forget them."""
        if rules is None:
            self._rules.pop((backend.name, spec), None)
        else:
            self._rules[(backend.name, spec)] = rules

    def rules(self, backend, spec) -> list:
        key = (backend.name, spec)
        if key not in self._rules:
            if len(self._rules) >= 64:  # per-request configs come and go: keep the cache bounded
                self._rules.clear()
            self._rules[key] = [backend.layer_rules(spec, self, i) for i in range(self.args.num_layers)]
        return self._rules[key]
