"""Mustafar's per-token magnitude pruning and the compressed token format it is stored in.

Every pruned K or V vector keeps the same number of elements (exact top-|x|), so a compressed
token is a fixed-size record: `keep` values in the cache dtype, in ascending channel order, and
a D-bit channel bitmap, uint8 [D // 8] with channel c at bit c % 8 of byte c // 8 (so on a
little-endian CPU 8 bytes read as a uint64 are 64 channels). A kept channel's value sits at the
popcount of the bits below it, so kernels expand a record straight from its bitmap, with no
per-step index decoding, and the metadata costs D / 8 bytes instead of a byte per kept value
(D = 64 at 70%: 19 * 4 + 8 = 84 bytes in fp32, 0.33 of dense; uint8 indices were 0.37).
Fixed records keep a compressed page fixed-size, so the paged pool stays a plain tensor that the
block manager allocates page by page, with no offsets. The paper's 64-element bitmap tiles need
variable-length packed values and prefix-sum offsets; `bitmap_tile_bytes` gives their bytes for
comparison (benchmarks/mustafar.py).
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


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., D] -> uint8 [..., D // 8], bit c % 8 of byte c // 8 = channel c."""
    if mask.shape[-1] % 8:
        raise ValueError(f"a channel bitmap needs a head dim that is a multiple of 8, not {mask.shape[-1]}")
    bits = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 8, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_bits(bitmap: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D // 8] -> bool [..., D], the inverse of pack_bits."""
    bits = bitmap.unsqueeze(-1) & _bit_weights(bitmap.device)
    return (bits != 0).reshape(*bitmap.shape[:-1], 8 * bitmap.shape[-1])


def compress(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., keep] in x's dtype, ascending channel order; bitmap uint8
    [..., D // 8]). Ascending order keeps each record's reads of q (keys) and writes of out
    (values) in order, and lets a channel find its value by a popcount."""
    idx = x.abs().topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return x.gather(-1, idx), pack_bits(mask)


def decompress(values: torch.Tensor, bitmap: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The pruned dense vectors [..., D] (zeros where elements were dropped): channel c takes
    the value at the popcount of the record's bits below c."""
    mask = unpack_bits(bitmap)
    if mask.shape[-1] != head_dim:
        raise ValueError(f"bitmap of {mask.shape[-1]} channels for head dim {head_dim}")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.where(mask, values.gather(-1, pos), values.new_zeros(()))


def prune(x: torch.Tensor, keep: int) -> torch.Tensor:
    """x with all but its `keep` largest-|x| elements per vector zeroed: the masked reference."""
    return decompress(*compress(x, keep), x.shape[-1])


def token_bytes(keep: int, elem: int, head_dim: int) -> int:
    """Bytes of one compressed token vector: the values and the D-bit channel bitmap."""
    return keep * elem + head_dim // 8


def bitmap_tile_bytes(nnz: int, elem: int) -> int:
    """The paper's tile of 64 elements: a 64-bit bitmap, an int32 offset, and the packed values
    padded to a multiple of 8 (16-byte aligned)."""
    return 8 + 4 + elem * 8 * math.ceil(nnz / 8)
