"""Compiled CPU paged decode: the whole batch's decode attention for one layer in one call
(csrc/paged_decode.cpp, built by cpu_build)."""
from __future__ import annotations

import torch

from sparsekv.attention.kernels.cpu_build import available, ops

__all__ = ["available", "supports", "paged_decode_cpu"]
HEAD_DIMS = (32, 64, 128)  # head dims the kernel is compiled for
DTYPES = (torch.float32, torch.bfloat16)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride over its last dim, as the compiled ops read queries (a copy only if not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def int32(x: torch.Tensor) -> torch.Tensor:
    """A table (block table, lengths) as the compiled ops take it: contiguous int32."""
    return x.to(torch.int32).contiguous()


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel covers q's device, dtype and head dim (callers check before calling)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


def paged_decode_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, page_lists: torch.Tensor | None = None,
                     return_lse: bool = False, row_lens: torch.Tensor | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over its pages: out [B, Hq, D] in q's dtype.

    q [B, Hq, D] (any strides); k, v [num_pages, Hkv, page_size, D] read in place through
    their strides (head-major is the fast case). block_table int32 [B, max_pages] maps logical
    to physical pages; seq_lens int32 [B] bounds the readable positions. page_lists int32
    [B, Hkv, n] of logical pages padded with -1 (may be expanded over Hkv) restricts each KV
    head to its listed pages. row_lens int32 [B, Hkv]: KV head h of sequence b reads only the
    last row_lens[b, h] of its seq_lens[b] positions (eviction with per-head budgets keeps each
    row's tokens right before the newest ones); earlier pages are not read. With return_lse
    also the float32 [B, Hq] log-sum-exp of the scaled logits (-inf for a sequence with nothing to read, whose output is zero).
    """
    lib = ops()
    if lib is None:
        raise RuntimeError("the CPU decode kernel is not built here; check available() first")
    if page_lists is not None:
        page_lists = page_lists.to(torch.int32)
    out, lse = lib.paged_decode(unit_rows(q), k, v, int32(block_table), int32(seq_lens), page_lists,
                                None if row_lens is None else int32(row_lens), float(scale), return_lse)
    return (out, lse) if return_lse else out


def quest_select_cpu(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, ratio: int, budget: int,
                     recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's selection for sequences past the budget (csrc/page_scores.cpp): q [B, Hq, D]
    against the page bounds kmin/kmax [num_pages, Hkv, D] of their pages; the `budget` best
    selection pages of `ratio` pool pages each (the last `recent` forced). Returns page lists
    int32 [B, Hkv, budget * ratio] of logical pool pages (-1 past the context) and the tokens
    they hold per sequence, summed over KV heads."""
    return tuple(ops().quest_select(unit_rows(q), kmin, kmax, int32(block_table), int32(seq_lens),
                                    page_size, ratio, budget, recent))


def delta_page_mass_cpu(q: torch.Tensor, k: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        lse: torch.Tensor, scale: float, per_group: bool) -> torch.Tensor:
    """DELTA's page mass (csrc/page_scores.cpp): per page of each sequence the sum over its tokens
    of the largest softmax probability over the query heads (per KV group with per_group), from
    q [B, Hq, D], the key pool [num_pages, Hkv, ps, D] and the decode's lse float32 [B, Hq].
    Returns float32 [B, Hkv or 1, max_pages], 0 past a sequence's pages."""
    return ops().delta_page_mass(unit_rows(q), k, int32(block_table), int32(seq_lens), lse.float().contiguous(),
                                 float(scale), per_group)
