"""Drives a CompressedKVCache step by step as the model runner does (plan_step, begin_step, then
per layer: write the step's K/V, run the backend), with each request's K/V history kept for
reference checks."""
from __future__ import annotations

import torch

from sparsekv.attention.backend import AttnShape, BackendParams, get_backend
from sparsekv.attention.metadata import AttnMetadata, RequestInput
from sparsekv.cache.compressed import CompressedKVCache, MustafarLayout
from sparsekv.cache.kv_cache import WriteIndex
from sparsekv.cache.kv_prune import prune


class Driver:
    def __init__(self, layout: MustafarLayout, hq: int = 4, hkv: int = 2, d: int = 16, page_size: int = 8,
                 layers: int = 2, num_pages: int = 96, num_rows: int = 64, seed: int = 0):
        self.layout, self.ps, self.d = layout, page_size, d
        self.shape = AttnShape(layers, hq, hkv, d, d ** -0.5)
        self.cache = CompressedKVCache(layers, num_pages, num_rows, page_size, hkv, d, torch.float32, "cpu", layout)
        self.free_pages = list(range(num_pages - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.hist: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # slot -> per layer k, v [Hkv, L, D]
        self.gen = torch.Generator().manual_seed(seed)

    def stream(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh K/V for n tokens per layer, [n, Hkv, D]."""
        hkv, d = self.shape.num_kv_heads, self.d
        return [(torch.randn(n, hkv, d, generator=self.gen), torch.randn(n, hkv, d, generator=self.gen))
                for _ in range(self.shape.num_layers)]

    def step(self, new: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], phase: str = "prefill",
             q: torch.Tensor | None = None, backend: str = "mustafar", device: str = "cpu",
             params: BackendParams | None = None) -> list[torch.Tensor]:
        """Append new[slot] (per layer K/V [n, Hkv, D]) to each request; with q ([rows, Hq, D]),
        run the backend at every layer and return its outputs."""
        reqs = []
        for slot, kv in new.items():
            n = kv[0][0].shape[0]
            end = self.lens.get(slot, 0) + n
            table = self.tables.setdefault(slot, [])
            while len(table) * self.ps < end:
                table.append(self.free_pages.pop())
            self.lens[slot] = end
            hist = self.hist.setdefault(slot, [(torch.empty(self.shape.num_kv_heads, 0, self.d),) * 2
                                               for _ in range(self.shape.num_layers)])
            for layer, (k, v) in enumerate(kv):
                hist[layer] = (torch.cat([hist[layer][0], k.transpose(0, 1)], 1),
                               torch.cat([hist[layer][1], v.transpose(0, 1)], 1))
            reqs.append(RequestInput(n, end, list(table), phase, slot))
        meta = AttnMetadata.build(reqs, self.ps, torch.device("cpu"))
        idx = WriteIndex.from_slots(meta.slot_mapping, self.ps)
        self.cache.plan_step(meta)
        self.cache.begin_step(idx)
        be = get_backend(backend, params or BackendParams(), device)
        plan = be.plan(meta.group(phase, 0, len(reqs)), self.shape) if q is not None else None
        self.last_plan = plan
        outs = []
        for layer in range(self.shape.num_layers):
            k = torch.cat([kv[layer][0] for kv in new.values()])
            v = torch.cat([kv[layer][1] for kv in new.values()])
            self.cache.write(layer, k, v, idx)
            if plan is not None:
                outs.append(be.forward(q, self.cache.layers[layer], layer, plan))
        return outs

    def expected(self, slot: int, layer: int, num_compressed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's K/V as the cache should read: pruned prefix, then dense."""
        k, v = self.hist[slot][layer]
        c = num_compressed
        return (torch.cat([prune(k[:, :c], self.layout.k_keep), k[:, c:]], 1),
                torch.cat([prune(v[:, :c], self.layout.v_keep), v[:, c:]], 1))

    def release(self, slot: int) -> None:
        self.cache.release(slot)
        self.free_pages.extend(self.tables.pop(slot))
        self.lens.pop(slot)
        self.hist.pop(slot)

