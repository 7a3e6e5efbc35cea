"""Compaction: each (layer, KV head) row's kept tokens move into the sequence's first n slots.

A row keeping c tokens fills slots [n - c, n) (its target; n - c is the row's start, 0 unless
rows keep their own budgets): right-aligned, so its tokens end where the next token is written
for every row, and the row reads one contiguous range. A row with h holes in its target has
exactly h kept tokens outside it; those move into the holes, so only the displaced tokens are
copied (one per row per decode step for H2O and StreamingLLM). Order within a row does not
matter to attention: K is stored after RoPE. Pages the moves wrote go through the side tables'
write hooks again (Quest's page bounds).
"""
from __future__ import annotations

import torch

from sparsekv.attention.mustafar import materialise, request_kv
from sparsekv.cache.compressed import CompressedKVCache
from sparsekv.cache.kv_cache import KVCache, WriteIndex


def copy_pages(cache: KVCache, swaps: list[tuple[int, int]]) -> None:
    """Copy-on-write: each (old, new) page's K/V, side-table rows and fill, in every layer."""
    if not swaps:
        return
    dev = cache.layers[0].k.device
    old, new = (torch.tensor(x, dtype=torch.long, device=dev) for x in zip(*swaps))
    for kv in cache.layers:
        for t in (kv.k, kv.v, *kv.side.values()):
            t[new] = t[old]
    cache.fill[new] = cache.fill[old]


def targets(keep: torch.Tensor, n: int, starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(holes, strays) bool [L, H, K]: target slots without a kept token, kept tokens outside
    the target [starts, n) of their row (starts int [L, H], None: 0)."""
    slot = torch.arange(keep.shape[-1], device=keep.device)
    target = slot < n
    if starts is not None:
        target = target & (slot >= starts.to(keep.device).unsqueeze(-1))
    return target & ~keep, keep & ~target


def move_plan(keep: torch.Tensor, n: int, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
    """keep bool [L, H, K] with n - starts True per row -> (layer, head, src, dst) slot moves,
    or None."""
    L, H, K = keep.shape
    hole, stray = targets(keep, n, starts)
    count = hole.sum(-1)
    m = int(count.max()) if n else 0
    if m == 0:
        return None
    big, slot = 2 * K, torch.arange(K, device=keep.device)
    dst = torch.where(hole, slot, big).sort(-1).values[..., :m]
    src = torch.where(stray, slot, big).sort(-1).values[..., :m]
    valid = torch.arange(m, device=keep.device) < count.unsqueeze(-1)
    layer, head, j = valid.nonzero(as_tuple=True)
    return layer, head, src[layer, head, j], dst[layer, head, j]


def compact(cache: KVCache, block_table: list[int], keep: torch.Tensor, n: int,
            state: tuple[torch.Tensor, ...] = (), starts: torch.Tensor | None = None) -> int | None:
    """Move kept tokens into slots [starts, n) of every row, in the pool and in the per-slot
    `state` tensors ([L, H, >=K]); return the first logical page written (None: nothing moved)."""
    moves = move_plan(keep, n, starts)
    if moves is None:
        return None
    layer, head, src, dst = moves
    ps = cache.page_size
    dev = cache.layers[0].k.device
    table = torch.tensor(block_table, dtype=torch.long, device=dev)
    sp, so, dp, do = (table[(src // ps).to(dev)], (src % ps).to(dev), table[(dst // ps).to(dev)], (dst % ps).to(dev))
    h, lay = head.to(dev), layer.to(dev)
    for t in state:
        t[layer, head, dst] = t[layer, head, src]
    touched = torch.unique(dst // ps)
    slots = torch.cat([torch.arange(p * ps, min(p * ps + ps, n)) for p in touched.tolist()])
    index = WriteIndex.from_slots((table[(slots // ps).to(dev)] * ps + (slots % ps).to(dev)), ps)
    for i, kv in enumerate(cache.layers):
        sel = lay == i
        if not bool(sel.any()):
            continue
        for pool in (kv.k, kv.v):
            pool[dp[sel], h[sel], do[sel]] = pool[sp[sel], h[sel], so[sel]]
        if cache.specs:
            k_rows = kv.k[index.pages, :, index.offsets]
            for spec in cache.specs.values():
                spec.on_write(kv, k_rows, index)
    last = (n - 1) // ps
    cache.fill[table[last]] = n - last * ps
    return int(touched.min())


def compact_compressed(cache: CompressedKVCache, slot: int, block_table: list[int], keep: torch.Tensor, n: int,
                       state: tuple[torch.Tensor, ...] = ()) -> int:
    """Eviction over a Mustafar cache (once, at the prompt's end): every row's n kept tokens, read
    as attention reads them (pruned where compressed), are written back in slot order into the
    first n slots, the old ones pruned and compressed, the newest staged dense, as the layout
    puts them for n tokens (CompressedKVCache.rewrite). Rewrites from page 0: returns 0."""
    cache.flush()
    kv_len = keep.shape[-1]
    table = torch.tensor(block_table, dtype=torch.long, device=cache.rows_dev.device)
    order = keep.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :n]  # [L, H, n] kept slots
    for t in state:
        t[..., :n] = t[..., :kv_len].gather(-1, order.to(t.device))
    keys, values = [], []
    for i, kv in enumerate(cache.layers):
        k, v = materialise(request_kv(kv, table, kv_len, cache.layout.compressed_len(kv_len)))
        idx = order[i].to(k.device).unsqueeze(-1).expand(-1, -1, k.shape[-1])
        keys.append(k.gather(1, idx))
        values.append(v.gather(1, idx))
    cache.rewrite(slot, block_table, keys, values, n)
    return 0
