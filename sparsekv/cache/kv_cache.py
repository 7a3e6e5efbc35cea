"""The paged KV pool: one LayerKV per layer, sized from a memory budget."""
from __future__ import annotations

import torch

from sparsekv.attention.backend import LayerKV


class KVCache:
    """Per-layer K/V pages [num_pages, Hkv, page_size, D] plus per-page key bounds.

    The bounds (element-wise min and max of each page's keys, per KV head) are Quest's page
    metadata; keeping them current on every write costs a scatter per step and spares the decode
    path a pass over all keys.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.page_size = page_size
        self.num_pages = num_pages
        self.layers = [LayerKV.allocate(num_pages, num_kv_heads, page_size, head_dim, dtype, device)
                       for _ in range(num_layers)]

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_kv_heads * head_dim * elem * (2 * page_size + 2)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new tokens' k, v ([T, Hkv, D]) at flat slots (page * page_size + offset)."""
        kv = self.layers[layer]
        pages = torch.div(slots, self.page_size, rounding_mode="floor")
        offsets = slots - pages * self.page_size
        kv.k[pages, :, offsets] = k
        kv.v[pages, :, offsets] = v
        fresh = pages[offsets == 0]  # pages (re)started by this write: old bounds are stale
        if fresh.numel():
            kv.kmin[fresh] = float("inf")
            kv.kmax[fresh] = float("-inf")
        idx = pages.view(-1, 1, 1).expand_as(k)
        kv.kmin.scatter_reduce_(0, idx, k, reduce="amin")
        kv.kmax.scatter_reduce_(0, idx, k, reduce="amax")
