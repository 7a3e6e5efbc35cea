"""Forward hooks that record what each layer's attention produced (and, on a few layers, its Q/K).

Only module names of the Hugging Face layout are used (`model.layers[i].self_attn.{q,k,o}_proj`,
`inv_freq`), so the hooks survive changes behind the attention seam: the input of `o_proj` is
the attention output whatever backend computed it, and Q/K are rebuilt from the projections with
the model's own rotary frequencies.
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
    q: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, Hq, D] pre-rope
    k: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [T, Hkv, D] pre-rope
    positions: list[torch.Tensor] = field(default_factory=list)

    def tag(self, start: int, stop: int) -> None:
        """The step just run computed tokens [start, stop)."""
        self.positions.append(torch.arange(start, stop))

    def attention(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [N], attention output [N, Hq*D]) of one layer."""
        return torch.cat(self.positions), torch.cat(self.attn[layer])

    def qk(self, layer: int, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-rope Q [Hq, N, D] and K [Hkv, N, D] of a captured layer, N = tokens in position order."""
        pos = torch.cat(self.positions)
        q, k = torch.cat(self.q[layer]), torch.cat(self.k[layer])
        order = pos.argsort()
        pos, q, k = pos[order], q[order], k[order]
        freqs = pos.float().unsqueeze(1) * model.inv_freq.cpu().float().unsqueeze(0)
        cos, sin = freqs.cos(), freqs.sin()
        return _rope(q, cos, sin).transpose(0, 1), _rope(k, cos, sin).transpose(0, 1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotation of the HF Llama checkpoints, in fp32: x [T, H, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _heads(out: torch.Tensor, head_dim: int, norm) -> torch.Tensor:
    x = out.detach().view(out.shape[0], -1, head_dim)
    return (norm(x) if norm is not None else x).float().cpu()


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
            for name, store in (("q", cap.q), ("k", cap.k)):
                norm = getattr(attn, f"{name}_norm", None)  # Qwen3's q/k norm comes before the rope
                handles.append(getattr(attn, f"{name}_proj").register_forward_hook(
                    lambda _m, _a, out, i=i, store=store, norm=norm: store.setdefault(i, []).append(
                        _heads(out, model.args.head_dim, norm))))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
