"""Compiled CPU key search of HiP (csrc/hip_search.cpp, built into the one CPU kernel library by
cpu_build): the probe, and the whole top-k tree in one call. Where it cannot be built,
`available()` is False and hip_search keeps its PyTorch probe (the reference)."""
from __future__ import annotations

import torch

from sparsekv.attention.kernels.cpu_build import available, ops

__all__ = ["available", "supports", "CpuProbe"]


def supports(qs: torch.Tensor, k: torch.Tensor) -> bool:
    return qs.device.type == "cpu" and qs.dtype == torch.float32 and k.dtype == torch.float32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride over its last dim (the kernel reads rows in place through the others)."""
    return x if x.stride(-1) == 1 else x.contiguous()


class CpuProbe:
    """A hip_search.TreeProbe: qs [U, M, D] the units' queries, k [Hkv, L, D] the keys (read in
    place), unit_kv [U] each unit's KV head."""

    def __init__(self, qs: torch.Tensor, k: torch.Tensor, unit_kv: torch.Tensor):
        self.qs, self.k, self.unit_kv = _rows(qs), _rows(k), unit_kv.to(torch.long).contiguous()

    def __call__(self, starts: torch.Tensor, width: int) -> torch.Tensor:
        return ops().hip_probe(self.qs, self.k, self.unit_kv, starts.to(torch.long).contiguous(), width)

    def tree(self, lo: torch.Tensor, hi: torch.Tensor, keep: int, block: int, rounds: int,
             center: bool) -> torch.Tensor:
        return ops().hip_tree(self.qs, self.k, self.unit_kv, lo.to(torch.long).contiguous(),
                              hi.to(torch.long).contiguous(), keep, block, rounds, center)
