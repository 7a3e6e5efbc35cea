"""Compiled CPU input-sparse products (csrc/sparse_rows.cpp), part of the one CPU kernel library
built on first use (attention/kernels/cpu_build.py)."""
from __future__ import annotations

import torch

from sparsekv.attention.kernels.cpu_build import available, ops


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and available()


def sparse_matvec_cpu(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor,
                      topk: int = 0) -> torch.Tensor:
    return ops().ffn_sparse_matvec(x.contiguous(), scale, thr, wt, topk)


def masked_input_cpu(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, topk: int = 0) -> torch.Tensor:
    return ops().ffn_masked_input(x.contiguous(), scale, thr, topk)


def gated_sparse_down_cpu(x: torch.Tensor, act: torch.Tensor, w_up: torch.Tensor, thr: torch.Tensor,
                          wt_down: torch.Tensor) -> torch.Tensor:
    return ops().ffn_gated_sparse_down(x.contiguous(), act.contiguous(), w_up, thr, wt_down)
