"""Compiled CPU decode over Mustafar-compressed tokens (csrc/compressed_decode.cpp), built on
first use into the one CPU kernel library (cpu_build); where it cannot be built, `available()`
is False and the backend keeps its PyTorch path."""
from __future__ import annotations

import torch

from sparsekv.attention.kernels.cpu_build import available, ops
from sparsekv.attention.kernels.cpu_decode import int32, supports, unit_rows

__all__ = ["available", "supports", "compressed_decode_cpu"]


def compressed_decode_cpu(q: torch.Tensor, kc: torch.Tensor, kb: torch.Tensor, vc: torch.Tensor, vb: torch.Tensor,
                          block_table: torch.Tensor, num_compressed: torch.Tensor, scale: float,
                          window: tuple[torch.Tensor, torch.Tensor] | None = None,
                          page_lists: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence (q [B, Hq, D]) over its first num_compressed[i] tokens, read from
    the records: values kc/vc [num_pages, Hkv, ps, keep] in q's dtype and channel bitmaps kb/vb
    uint8 [num_pages, Hkv, ps, D // 8] (kv_prune.py), through block_table int32 [B, max_pages].
    `window` (out [B, Hq, D], lse float32 [B, Hq]) is another attention's result over the
    sequence's other keys, merged in by log-sum-exp. page_lists int32 [B, Hkv, n] of logical
    compressed pages padded with -1 (may be expanded over Hkv) restricts each KV head to its pages.
    Returns normalised out [B, Hq, D] in q's dtype and lse float32 [B, Hq] (-inf: nothing)."""
    w_out, w_lse = window if window is not None else (None, None)
    return ops().compressed_decode(unit_rows(q), kc, kb, vc, vb, int32(block_table), int32(num_compressed),
                                   float(scale), w_out, None if w_lse is None else w_lse.contiguous(),
                                   None if page_lists is None else page_lists.to(torch.int32))
