"""Forward hooks that record what each layer's attention produced (and, on a few layers, its Q/K).

Two hook points: the input of `self_attn.o_proj` is the attention output whatever backend
computed it, and the input of `self_attn.attn` (the attention seam) is the roped q, k, v the
backends see, so Q/K need no rope of their own (scaled ropes included).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class Capture:
    """Rows per layer in the order the model computed them; `positions` says which token each
    row belongs to (one sequence at a time, so the caller tags every step)."""

    attn: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, Hq*D] chunks
    q: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, Hq, D] post-rope
    k: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, Hkv, D] post-rope
    positions: list[torch.Tensor] = field(default_factory=list)

    def tag(self, start: int, stop: int) -> None:
        """The step just run computed tokens [start, stop)."""
        self.positions.append(torch.arange(start, stop))

    def attention(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [N], attention output [N, Hq*D]) of one layer."""
        return torch.cat(self.positions), torch.cat(self.attn[layer])

    def qk(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-rope Q [Hq, N, D] and K [Hkv, N, D] of a captured layer, N = tokens in position order."""
        order = torch.cat(self.positions).argsort()
        q, k = torch.cat(self.q[layer])[order], torch.cat(self.k[layer])[order]
        return q.transpose(0, 1), k.transpose(0, 1)


@contextmanager
def capture(model, qk_layers: tuple[int, ...] = ()) -> Iterator[Capture]:
    """Record every layer's attention output, and Q/K on `qk_layers`, while the block runs."""
    cap = Capture()
    handles = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        handles.append(attn.o_proj.register_forward_pre_hook(
            lambda _m, args, i=i: cap.attn.setdefault(i, []).append(args[0].detach().float().cpu())))
        if i in qk_layers:
            def keep(_m, args, i=i) -> None:
                cap.q.setdefault(i, []).append(args[0].detach().float().cpu())
                cap.k.setdefault(i, []).append(args[1].detach().float().cpu())
            handles.append(attn.attn.register_forward_pre_hook(keep))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
