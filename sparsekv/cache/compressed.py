"""Mustafar's KV pool: compressed pages for old tokens, a small dense staging pool for recent ones.

The block manager's page ids index the compressed pool (fixed-size records, kv_prune.py), which
is what the KV budget and admission count. A page's tokens are written dense into a staging row
leased to that page; once a request's tokens fall `local_window` behind its end they are pruned
and compressed `compress_chunk` tokens at a time (the paper's kernel path: the dense tail runs
between window and window + chunk), and the row goes back to the staging pool. Which prefix is
compressed is a function of the length alone (`compressed_len`), so backends need no state.

Each layer's tokens are compressed right after that layer's attention in the step that pushed
them out of the window (at the next layer's write; the last layer's at the next step's start),
so a step's attention, prefill in particular, reads its own tokens dense, and the staging pool
holds only the dense tails plus one step's new tokens. Rows are leased per request slot and
returned by `release(slot)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsekv.cache.kv_cache import PAGE_BOUNDS, KVCache, KVSpec, LayerKV, WriteIndex
from sparsekv.cache.kv_prune import compress, decompress, token_bytes


@dataclass(frozen=True)
class MustafarLayout:
    k_keep: int  # elements kept per key vector (after RoPE)
    v_keep: int
    local_window: int  # most recent tokens never pruned
    compress_chunk: int  # tokens compressed at once, a multiple of the page size

    def compressed_len(self, seq_len: int) -> int:
        """Tokens stored compressed once a request holds seq_len tokens."""
        return max(0, seq_len - self.local_window) // self.compress_chunk * self.compress_chunk

    def page_bytes(self, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, elem: int) -> int:
        """Bytes of one compressed page over all layers (K and V records)."""
        per_token = token_bytes(self.k_keep, elem, head_dim) + token_bytes(self.v_keep, elem, head_dim)
        return num_layers * num_kv_heads * page_size * per_token

    def staging_rows(self, max_num_seqs: int, max_num_batched_tokens: int, page_size: int) -> int:
        """Dense rows that can be leased at once: each request's dense tail (under window +
        chunk, a partial page at each end) and one step of new tokens (plus a partial page per
        request). Prefill chunks are staged dense, so --max-num-batched-tokens sizes this."""
        tail = -(-(self.local_window + self.compress_chunk) // page_size) + 2
        return max_num_seqs * (tail + 1) + -(-max_num_batched_tokens // page_size)


@dataclass(eq=False, kw_only=True)
class CompressedLayerKV(LayerKV):
    """k, v are the dense staging rows [num_rows, Hkv, ps, D]; kc/kb and vc/vb the compressed
    pages: values [num_pages, Hkv, ps, keep] and channel bitmaps uint8 [num_pages, Hkv, ps, D // 8]
    (kv_prune.py), head-major underneath. `rows` maps a page to its staging row (-1: none),
    shared by every layer."""

    kc: torch.Tensor
    kb: torch.Tensor
    vc: torch.Tensor
    vb: torch.Tensor
    rows: torch.Tensor
    layout: MustafarLayout

    def compress_pages(self, pages: torch.Tensor, rows: torch.Tensor) -> None:
        """Prune the staged tokens of `pages` (held in `rows`) into their compressed records."""
        self.store(pages, self.k[rows], self.v[rows])

    def store(self, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prune dense k, v [n, Hkv, ps, D] into the records of `pages`, and with Quest's bounds
        table the element-wise min / max of the pruned keys: the keys attention reads, so the
        bound holds for them (a dropped channel counts as 0)."""
        for dense, vals, bits, keep in ((k, self.kc, self.kb, self.layout.k_keep),
                                        (v, self.vc, self.vb, self.layout.v_keep)):
            vals[pages], bits[pages] = compress(dense, keep)
        if "kmin" in self.side:
            keys = decompress(self.kc[pages], self.kb[pages], self.k.shape[-1])  # [n, Hkv, ps, D]
            self.side["kmin"][pages], self.side["kmax"][pages] = keys.amin(2), keys.amax(2)


def _head_major(num_pages: int, hkv: int, ps: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros((hkv, num_pages, ps, width), dtype=dtype, device=device).transpose(0, 1)


class CompressedKVCache(KVCache):
    def __init__(self, num_layers: int, num_pages: int, num_rows: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, layout: MustafarLayout):
        if layout.compress_chunk % page_size:
            raise ValueError(f"kv.compress_chunk {layout.compress_chunk} must be a multiple of the "
                             f"KV page size {page_size}")
        if head_dim % 8:
            raise ValueError(f"Mustafar's channel bitmaps need a head dim that is a multiple of 8, not {head_dim}")
        self.page_size, self.num_pages, self.layout = page_size, num_pages, layout
        self.rows = torch.full((num_pages,), -1, dtype=torch.long)  # host master
        self.rows_dev = self.rows.to(device)
        self.layers = []
        for _ in range(num_layers):
            staged = LayerKV.allocate(num_rows, num_kv_heads, page_size, head_dim, dtype, device)
            self.layers.append(CompressedLayerKV(
                k=staged.k, v=staged.v, rows=self.rows_dev, layout=layout,
                kc=_head_major(num_pages, num_kv_heads, page_size, layout.k_keep, dtype, device),
                kb=_head_major(num_pages, num_kv_heads, page_size, head_dim // 8, torch.uint8, device),
                vc=_head_major(num_pages, num_kv_heads, page_size, layout.v_keep, dtype, device),
                vb=_head_major(num_pages, num_kv_heads, page_size, head_dim // 8, torch.uint8, device)))
        self.fill = torch.zeros(num_pages, dtype=torch.long, device=device)
        self.specs = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))
        self._owned: dict[int, set[int]] = {}  # slot -> its pages holding a staging row
        # pages being compressed this step, layer by layer: (pages, their slots, on the device, their rows)
        self._compressing: tuple[list[int], list[int], torch.Tensor, torch.Tensor] | None = None
        self._write_rows: torch.Tensor | None = None

    def ensure(self, spec: KVSpec) -> None:
        """Quest's page bounds over the compressed pages (head-major, filled as pages are
        compressed; the dense window is always attended, so its pages need none)."""
        if spec.name != PAGE_BOUNDS.name:
            raise ValueError(f"side table {spec.name!r} is not kept over a Mustafar-compressed cache")
        if spec.name not in self.specs:
            for kv in self.layers:
                hkv, d = kv.kc.shape[1], kv.k.shape[3]
                kv.side["kmin"] = _head_major(self.num_pages, hkv, 1, d, kv.k.dtype, kv.k.device)[:, :, 0]
                kv.side["kmax"] = torch.zeros_like(kv.side["kmin"])
                for a in range(0, self.num_pages, 256):  # pages compressed before now, from their records
                    keys = decompress(kv.kc[a:a + 256], kv.kb[a:a + 256], d)
                    kv.side["kmin"][a:a + 256], kv.side["kmax"][a:a + 256] = keys.amin(2), keys.amax(2)
            self.specs[spec.name] = spec

    def plan_step(self, meta) -> None:
        """Finish the last step's compression (its last layer), lease rows to the pages this
        step writes first, and schedule the pages whose tokens leave the window in this step."""
        if self._compressing is not None:
            self._compress(len(self.layers) - 1)
        ps, rows = self.page_size, self.rows
        pages, slots = [], []
        for slot, table, end, q in zip(meta.req_slots_cpu, meta.block_tables_cpu, meta.seq_lens_cpu, meta.q_lens_cpu):
            owned = self._owned.setdefault(slot, set())
            for p in table[(end - q) // ps:].tolist():
                if rows[p] < 0:
                    if not self._free_rows:
                        raise RuntimeError("the Mustafar staging pool is exhausted")
                    rows[p] = self._free_rows.pop()
                    owned.add(p)
            lo, hi = self.layout.compressed_len(end - q), self.layout.compressed_len(end)
            pages += table[lo // ps:hi // ps].tolist()
            slots += [slot] * ((hi - lo) // ps)
        self._schedule(pages, slots)
        self.rows_dev.copy_(rows)

    def _schedule(self, pages: list[int], slots: list[int]) -> None:
        dev = self.rows_dev.device
        self._compressing = (pages, slots, torch.tensor(pages, dtype=torch.long, device=dev),
                             self.rows[pages].to(dev)) if pages else None

    def _compress(self, layer: int) -> None:
        """Compress the scheduled pages of `layer` (its attention for this step is done); after
        the last layer their rows go back to the pool."""
        pages, slots, pages_dev, rows_dev = self._compressing
        self.layers[layer].compress_pages(pages_dev, rows_dev)
        if layer == len(self.layers) - 1:
            for p, s in zip(pages, slots):
                self._free_row(p, self._owned.get(s))
            self.rows_dev.copy_(self.rows)
            self._compressing = None

    def flush(self) -> None:
        """Finish the pending compression (the last layer's, due at the next step's start), so
        every layer holds [0, compressed_len) compressed and the rest staged."""
        if self._compressing is not None:
            self._compress(len(self.layers) - 1)

    def rewrite(self, slot: int, table: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                n: int) -> None:
        """Replace the request's tokens by n others per layer (eviction's survivors, dense [Hkv, n, D]
        each, slot order): the first compressed_len(n) pruned into the records of their pages, the
        rest staged dense. Rows of pages that stage nothing now go back first (freed before they
        are leased, so the request never holds more than its dense tail)."""
        ps = self.page_size
        cut, end = self.layout.compressed_len(n) // ps, -(-n // ps)
        owned = self._owned.setdefault(slot, set())
        for i, p in enumerate(table):
            if (i < cut or i >= end) and self.rows[p] >= 0:
                self._free_row(p, owned)
        for p in table[cut:end]:
            if self.rows[p] < 0:
                if not self._free_rows:
                    raise RuntimeError("the Mustafar staging pool is exhausted")
                self.rows[p] = self._free_rows.pop()
                owned.add(p)
        self.rows_dev.copy_(self.rows)
        dev = self.rows_dev.device
        compressed = torch.tensor(table[:cut], dtype=torch.long, device=dev)
        rows = self.rows_dev[torch.tensor(table[cut:end], dtype=torch.long, device=dev)]
        for kv, *kept in zip(self.layers, keys, values):
            hkv, _, d = kept[0].shape
            pages = [torch.nn.functional.pad(x, (0, 0, 0, end * ps - n)).view(hkv, end, ps, d).transpose(0, 1)
                     for x in kept]  # [end, Hkv, ps, D], the last page zero-padded
            if cut:
                kv.store(compressed, pages[0][:cut], pages[1][:cut])
            kv.k[rows], kv.v[rows] = pages[0][cut:], pages[1][cut:]
        last = (n - 1) // ps
        self.fill[table[last]] = n - last * ps

    def begin_step(self, idx: WriteIndex) -> None:
        super().begin_step(idx)
        self._write_rows = self.rows_dev[idx.pages]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, idx: WriteIndex) -> None:
        if layer > 0 and self._compressing is not None:
            self._compress(layer - 1)
        kv = self.layers[layer]
        kv.k[self._write_rows, :, idx.offsets] = k
        kv.v[self._write_rows, :, idx.offsets] = v

    def _free_row(self, page: int, owned: set[int] | None) -> None:
        if self.rows[page] >= 0:
            self._free_rows.append(int(self.rows[page]))
            self.rows[page] = -1
        if owned is not None:
            owned.discard(page)

    def release(self, slot: int) -> None:
        """The request in `slot` ended or was preempted: its staged rows return to the pool and
        its pending compression is dropped (its pages go back to the block manager)."""
        if self._compressing is not None:  # its pages may be handed out again before plan_step
            keep = [(p, s) for p, s in zip(*self._compressing[:2]) if s != slot]
            self._schedule([p for p, _ in keep], [s for _, s in keep])
        for p in self._owned.pop(slot, ()):
            self._free_row(p, None)
        self.rows_dev.copy_(self.rows)
