"""Small decode batches over a paged cache, shared by the DELTA, Quest and Triton decode tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttnShape, Plan, get_backend, params_class
from sparsekv.attention.metadata import AttnMetadata, RequestInput
from sparsekv.cache.kv_cache import PAGE_BOUNDS, KVCache, WriteIndex


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

    def plan(self, be, only: list[int] | None = None, num_layers: int = 8,
             row_lens: list[torch.Tensor | None] | None = None) -> Plan:
        """One decode step's plan for all (or `only` these) sequences, as the engine makes it;
        row_lens: per sequence, its [layers, Hkv] row lengths or None (RequestInput.row_lens)."""
        idx = only if only is not None else list(range(len(self.lens)))
        rows = row_lens or [None] * len(self.lens)
        reqs = [RequestInput(1, self.lens[i], self.tables[i].tolist(), "decode", slot=i, row_lens=rows[i])
                for i in idx]
        meta = AttnMetadata.build(reqs, self.cache.page_size, torch.device("cpu"))
        hq, hkv, d = self.q.shape[1], self.kv.k.shape[1], self.q.shape[2]
        for spec in be.kv_spec:
            self.cache.ensure(spec)
        return be.plan(meta.group("decode", 0, len(idx)), AttnShape(num_layers, hq, hkv, d, self.scale))

    def run(self, be, layer: int = 0, plan: Plan | None = None, only: list[int] | None = None):
        """(output, plan) of one layer; pass the plan on to run later layers of the same step."""
        plan = plan or self.plan(be, only)
        q = self.q if only is None else self.q[only]
        return be.forward(q, self.kv, layer, plan), plan


def attended(plan: Plan) -> list[int]:
    return [int(a) for a in plan.attended.tolist()]


def make_case(lens: list[int], hq: int = 4, hkv: int = 2, d: int = 16, page_size: int = 16,
              dtype: torch.dtype = torch.float32, seed: int = 0, spare_pages: int = 7) -> Case:
    """Random keys, values and queries; each sequence's pages are scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    total = sum(need) + spare_pages
    cache = KVCache(1, total, page_size, hkv, d, dtype, torch.device("cpu"), (PAGE_BOUNDS,))
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
        write(cache, k, v, slots)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    return Case(q=q, cache=cache, lens=list(lens), tables=tables, scale=d ** -0.5)


def backend(name: str, device: str = "cpu", **params):
    return get_backend(name, params_class(name, "decode")(**params), device)


def write(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, layer: int = 0) -> None:
    """Store tokens at flat slots the way a model step does."""
    idx = WriteIndex.from_slots(slots, cache.page_size)
    cache.begin_step(idx)
    cache.write(layer, k, v, idx)


def keys(case: Case, seq: int) -> torch.Tensor:
    """The sequence's keys [Hkv, L, D] in token order."""
    ps = case.cache.page_size
    pos = torch.arange(case.lens[seq])
    return case.kv.k[case.tables[seq][pos // ps], :, pos % ps].transpose(0, 1)


def plant_heavy_key(case: Case, seq: int, pos: int, head: int, norm: float = 50.0) -> None:
    """Make key `pos` of KV head `head` point along its group's queries, with a large norm.

    The whole page is rewritten through the cache's write path, so its key bounds stay right.
    """
    ps, hkv = case.cache.page_size, case.kv.k.shape[1]
    g = case.q.shape[1] // hkv
    page = case.tables[seq][pos // ps]
    used = min(ps, case.lens[seq] - pos // ps * ps)
    k = case.kv.k[page, :, :used].transpose(0, 1).clone()  # [used, Hkv, D]
    v = case.kv.v[page, :, :used].transpose(0, 1).clone()
    direction = case.q[seq, head * g:(head + 1) * g].float().sum(0)
    k[pos % ps, head] = (norm * direction / direction.norm()).to(k.dtype)
    write(case.cache, k, v, page * ps + torch.arange(used))


def dense_out(case: Case, only: list[int] | None = None) -> torch.Tensor:
    return case.run(backend("dense"), only=only)[0]
