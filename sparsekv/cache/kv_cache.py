"""The paged KV pool: one LayerKV per layer, plus the side tables the backends declare.

Pages are stored head-major ([Hkv, num_pages, page_size, D] underneath, indexed as
[num_pages, Hkv, page_size, D]): a KV head's run of consecutive pages is one contiguous block,
which the CPU decode reads in place instead of copying. A side table (Quest's page key bounds
today, Mustafar's bitmaps or eviction scores later) is allocated only once a backend that
declares it in `kv_spec` runs, and is kept current by its write hook on every write after that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class WriteIndex:
    """Where a step's new tokens go, worked out once per step and shared by every layer."""

    slots: torch.Tensor  # flat slots page * page_size + offset, [T]
    pages: torch.Tensor
    offsets: torch.Tensor
    fresh: torch.Tensor  # pages (re)started by this write (offset 0): their side entries are stale

    @classmethod
    def from_slots(cls, slots: torch.Tensor, page_size: int) -> "WriteIndex":
        pages = torch.div(slots, page_size, rounding_mode="floor")
        offsets = slots - pages * page_size
        return cls(slots, pages, offsets, pages[offsets == 0])


@dataclass
class LayerKV:
    """One layer's pages and side tables (name -> [num_pages, Hkv, ...] tensors)."""

    k: torch.Tensor
    v: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def allocate(cls, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "LayerKV":
        shape = (num_kv_heads, num_pages, page_size, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1),
                   v=torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1))

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def kmin(self) -> torch.Tensor | None:
        return self.side.get("kmin")

    @property
    def kmax(self) -> torch.Tensor | None:
        return self.side.get("kmax")

    def token_major(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """k, v as [Hkv, num_pages * page_size, D] views of a head-major pool (None otherwise):
        consecutive pages are then one slice, the cheapest read on the CPU hot path."""
        if self._flat is None and self.k.transpose(0, 1).is_contiguous() and self.v.transpose(0, 1).is_contiguous():
            hkv, d = self.k.shape[1], self.k.shape[3]
            self._flat = (self.k.transpose(0, 1).view(hkv, -1, d), self.v.transpose(0, 1).view(hkv, -1, d))
        return self._flat


@dataclass(frozen=True)
class KVSpec:
    """A side table a backend needs: how to allocate it from a layer's pool and keep it current."""

    name: str
    allocate: Callable[[LayerKV, torch.Tensor], None]  # (kv, tokens written per page): adds kv.side tables
    on_write: Callable[[LayerKV, torch.Tensor, WriteIndex], None]  # after new keys are stored
    page_bytes: Callable[[int, int, int], int]  # (num_kv_heads, head_dim, element size) -> bytes per page


def _bounds_allocate(kv: LayerKV, fill: torch.Tensor) -> None:
    """Element-wise min and max of each page's keys, head-major like the keys (Quest's scoring
    reads a head's consecutive pages in place). Computed from the tokens written so far, so a
    table made mid-run equals one kept up to date from the start."""
    kh = kv.k.transpose(0, 1)  # [Hkv, num_pages, ps, D]
    stale = (torch.arange(kv.page_size, device=kh.device).view(1, -1) >= fill.view(-1, 1)).view(1, -1, kv.page_size, 1)
    kv.side["kmin"] = kh.masked_fill(stale, float("inf")).amin(2).transpose(0, 1)
    kv.side["kmax"] = kh.masked_fill(stale, float("-inf")).amax(2).transpose(0, 1)


def _bounds_write(kv: LayerKV, k: torch.Tensor, idx: WriteIndex) -> None:
    if idx.fresh.numel():
        kv.side["kmin"][idx.fresh] = float("inf")
        kv.side["kmax"][idx.fresh] = float("-inf")
    rows = idx.pages.view(-1, 1, 1).expand_as(k)
    kv.side["kmin"].scatter_reduce_(0, rows, k, reduce="amin")
    kv.side["kmax"].scatter_reduce_(0, rows, k, reduce="amax")


PAGE_BOUNDS = KVSpec("page_bounds", _bounds_allocate, _bounds_write, lambda hkv, d, e: 2 * hkv * d * e)


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, specs: tuple[KVSpec, ...] = ()):
        self.page_size = page_size
        self.num_pages = num_pages
        self.layers = [LayerKV.allocate(num_pages, num_kv_heads, page_size, head_dim, dtype, device)
                       for _ in range(num_layers)]
        self.fill = torch.zeros(num_pages, dtype=torch.long, device=device)  # tokens written per page
        self.specs: dict[str, KVSpec] = {}
        for spec in specs:
            self.ensure(spec)

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, specs: tuple[KVSpec, ...] = ()) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        side = sum(s.page_bytes(num_kv_heads, head_dim, elem) for s in specs)
        return num_layers * (2 * page_size * num_kv_heads * head_dim * elem + side)

    def ensure(self, spec: KVSpec) -> None:
        """Allocate a side table on first use (a request may ask for a method the server's
        config does not name)."""
        if spec.name not in self.specs:
            for kv in self.layers:
                spec.allocate(kv, self.fill)
            self.specs[spec.name] = spec

    def plan_step(self, meta) -> None:
        """Hook before begin_step with the step's AttnMetadata (requests, slots, tables): caches
        that manage pages per request (CompressedKVCache) act on it; the plain pool needs nothing."""

    def release(self, slot: int) -> None:
        """Hook when the request in `slot` ends or is preempted (its pages return to the block
        manager); the plain pool keeps no per-request state."""

    def begin_step(self, idx: WriteIndex) -> None:
        """Track how far each page is written (the same for every layer), once per step."""
        self.fill[idx.fresh] = 0
        self.fill.scatter_reduce_(0, idx.pages, idx.offsets + 1, reduce="amax")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, idx: WriteIndex) -> None:
        """Store new tokens' k, v ([T, Hkv, D]) at the step's slots, then update side tables."""
        kv = self.layers[layer]
        flat = kv.token_major()
        if flat is not None:  # one index_copy_ per pool instead of an index_put over two index tensors
            flat[0].index_copy_(1, idx.slots, k.transpose(0, 1))
            flat[1].index_copy_(1, idx.slots, v.transpose(0, 1))
        else:
            kv.k[idx.pages, :, idx.offsets] = k
            kv.v[idx.pages, :, idx.offsets] = v
        for spec in self.specs.values():
            spec.on_write(kv, k, idx)
