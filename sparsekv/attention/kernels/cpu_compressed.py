"""Compiled CPU decode over Mustafar-compressed tokens (csrc/compressed_decode.cpp), built on
first use into the one CPU kernel library (cpu_build); where it cannot be built, `available()`
is False and the backend keeps its PyTorch path."""
from __future__ import annotations

import torch

from sparsekv.attention.kernels.cpu_build import available, ops

__all__ = ["available", "supports", "compressed_decode_cpu"]


def supports(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32


def compressed_decode_cpu(q: torch.Tensor, kc: torch.Tensor, ki: torch.Tensor, vc: torch.Tensor, vi: torch.Tensor,
                          block_table: torch.Tensor, num_compressed: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence (q [B, Hq, D]) over its first num_compressed[i] tokens, read from
    the records kc/vc (values) and ki/vi (uint8 indices) [num_pages, Hkv, ps, keep] through
    block_table int32 [B, max_pages]: normalised out [B, Hq, D] and lse [B, Hq] (-inf: none)."""
    return ops().compressed_decode(q, kc, ki, vc, vi, block_table.to(torch.int32).contiguous(),
                                     num_compressed.to(torch.int32).contiguous(), float(scale))
