"""Compiled CPU input-sparse products (csrc/sparse_rows.cpp), built on first use (jit_build)."""
from __future__ import annotations

from pathlib import Path

import torch

from sparsekv.attention.kernels.jit_build import build_extension

_SOURCE = Path(__file__).parent / "csrc" / "sparse_rows.cpp"


def available() -> bool:
    return build_extension(_SOURCE, "sparsekv_ffn_sparse")


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and available()


def sparse_matvec_cpu(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    return torch.ops.sparsekv_ffn_cpu.sparse_matvec(x.contiguous(), scale, thr, wt)


def gather_dot_cpu(x: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.ops.sparsekv_ffn_cpu.gather_dot(x.contiguous(), m, idx)
