"""Mustafar's per-token magnitude pruning and the compressed token format it is stored in.

Every pruned K or V vector keeps the same number of elements (exact top-|x|), so a compressed
token is a fixed-size record: `keep` values in the cache dtype plus `keep` uint8 channel indices
in ascending order. Fixed records make a compressed page fixed-size too, so the paged pool stays
a plain tensor that the block manager allocates page by page, and no offsets are needed. The
paper's 64-element bitmap tiles need variable-length packed values and prefix-sum offsets; their
bytes are given by `bitmap_tile_bytes` for comparison (see benchmarks/mustafar.py).
"""
from __future__ import annotations

import math

import torch

KEEP_RULES = ("exact_topk", "mustafar_compat")


def keep_count(sparsity: float, head_dim: int, rule: str = "exact_topk") -> int:
    """Elements kept per token vector. exact_topk keeps round((1 - s) D); mustafar_compat
    reproduces the reference code's threshold at its k-th smallest |x|, which keeps D - int(s D) + 1
    (ties aside: a fixed-size record cannot hold them), so 40 of 128 at s = 0.7."""
    if rule == "exact_topk":
        keep = round((1.0 - sparsity) * head_dim)
    elif rule == "mustafar_compat":
        keep = head_dim - int(sparsity * head_dim) + 1
    else:
        raise ValueError(f"keep_rule {rule!r}; known: {', '.join(KEEP_RULES)}")
    return max(1, min(head_dim, keep))


def compress(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., keep] in x's dtype, uint8 indices [..., keep] ascending).
    Ascending indices keep each record's reads of q (keys) and writes of out (values) in order."""
    idx = x.abs().topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    return x.gather(-1, idx), idx.to(torch.uint8)


def decompress(values: torch.Tensor, idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The pruned dense vectors [..., D] (zeros where elements were dropped)."""
    out = values.new_zeros((*values.shape[:-1], head_dim))
    return out.scatter_(-1, idx.long(), values)


def prune(x: torch.Tensor, keep: int) -> torch.Tensor:
    """x with all but its `keep` largest-|x| elements per vector zeroed: the masked reference."""
    return decompress(*compress(x, keep), x.shape[-1])


def token_bytes(keep: int, elem: int) -> int:
    """Bytes of one compressed token vector (values + uint8 indices)."""
    return keep * (elem + 1)


def bitmap_tile_bytes(nnz: int, elem: int) -> int:
    """The paper's tile of 64 elements: a 64-bit bitmap, an int32 offset, and the packed values
    padded to a multiple of 8 (16-byte aligned)."""
    return 8 + 4 + elem * 8 * math.ceil(nnz / 8)
