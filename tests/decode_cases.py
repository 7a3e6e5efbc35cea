"""Small decode batches over a paged cache, shared by the DELTA, Quest and Triton decode tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttnBatch, SeqAttn, backend_class, get_backend
from sparsekv.cache.kv_cache import KVCache


@dataclass
class Case:
    q: torch.Tensor  # [num_seqs, Hq, D]
    cache: KVCache
    lens: list[int]
    tables: list[torch.Tensor]
    scale: float

    @property
    def kv(self):
        return self.cache.layers[0]

    def seqs(self, states: list[dict] | None = None, only: list[int] | None = None) -> list[SeqAttn]:
        """SeqAttn for all (or `only` these) sequences; states[j] belongs to the j-th one."""
        idx = only if only is not None else list(range(len(self.lens)))
        return [SeqAttn(q_start=j, q_len=1, context_len=self.lens[i], block_table=self.tables[i],
                        state=states[j] if states is not None else {}) for j, i in enumerate(idx)]

    def batch(self, layer: int, seqs: list[SeqAttn], num_layers: int = 8) -> AttnBatch:
        return AttnBatch("decode", layer, num_layers, self.scale, seqs)


def make_case(lens: list[int], hq: int = 4, hkv: int = 2, d: int = 16, page_size: int = 16,
              dtype: torch.dtype = torch.float32, seed: int = 0, spare_pages: int = 7) -> Case:
    """Random keys, values and queries; each sequence's pages are scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    total = sum(need) + spare_pages
    cache = KVCache(1, total, page_size, hkv, d, dtype, torch.device("cpu"))
    perm = torch.randperm(total, generator=g)
    tables, start = [], 0
    for n_tok, n in zip(lens, need):
        table = perm[start:start + n]
        start += n
        tables.append(table)
        pos = torch.arange(n_tok)
        slots = table[pos // page_size] * page_size + pos % page_size
        k = torch.randn(n_tok, hkv, d, generator=g).to(dtype)
        v = torch.randn(n_tok, hkv, d, generator=g).to(dtype)
        cache.write(0, k, v, slots)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    return Case(q=q, cache=cache, lens=list(lens), tables=tables, scale=d ** -0.5)


def backend(name: str, **params):
    return get_backend(name, backend_class(name, "decode").Params(**params))


def keys(case: Case, seq: int) -> torch.Tensor:
    """The sequence's keys [Hkv, L, D] in token order."""
    ps = case.cache.page_size
    pos = torch.arange(case.lens[seq])
    return case.kv.k[case.tables[seq][pos // ps], :, pos % ps].transpose(0, 1)


def plant_heavy_key(case: Case, seq: int, pos: int, head: int, norm: float = 50.0) -> None:
    """Make key `pos` of KV head `head` point along its group's queries, with a large norm.

    The whole page is rewritten through KVCache.write, so its key bounds stay right.
    """
    ps, hkv = case.cache.page_size, case.kv.k.shape[1]
    g = case.q.shape[1] // hkv
    page = case.tables[seq][pos // ps]
    used = min(ps, case.lens[seq] - pos // ps * ps)
    k = case.kv.k[page, :, :used].transpose(0, 1).clone()  # [used, Hkv, D]
    v = case.kv.v[page, :, :used].transpose(0, 1).clone()
    direction = case.q[seq, head * g:(head + 1) * g].float().sum(0)
    k[pos % ps, head] = (norm * direction / direction.norm()).to(k.dtype)
    case.cache.write(0, k, v, page * ps + torch.arange(used))


def dense_out(case: Case, only: list[int] | None = None) -> torch.Tensor:
    seqs = case.seqs(only=only)
    q = case.q if only is None else case.q[only]
    return backend("dense").forward(q, case.kv, case.batch(0, seqs))
