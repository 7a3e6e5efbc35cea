"""vLLM's per-step batch metadata and KV-cache tensor as sparsekv's AttnMetadata and LayerKV views.

sparsekv's seam already uses vLLM's CommonAttentionMetadata names, so translating is mostly
adding the host mirrors the backends plan from. Nothing here imports vLLM: `common` is read by
attribute, which keeps this module importable (and testable) without it.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsekv.attention.metadata import AttnMetadata, page_runs
from sparsekv.cache.kv_cache import KVSpec, LayerKV, WriteIndex


def attn_metadata(common: Any, block_size: int) -> AttnMetadata:
    """CommonAttentionMetadata (query_start_loc, seq_lens, block_table_tensor, slot_mapping, ...)
    -> AttnMetadata. Only the num_reqs real requests and num_actual_tokens real tokens are kept:
    vLLM pads both for its CUDA graphs. Requests are taken in vLLM's order; the builder asks vLLM
    to put decodes first (reorder_batch_threshold = 1), and routing groups runs of equal phase
    whatever the order."""
    n, t = common.num_reqs, common.num_actual_tokens
    loc = common.query_start_loc_cpu[:n + 1].tolist()
    seq_lens = common.seq_lens[:n]
    lens = seq_lens.tolist()  # one host read per step on CUDA; a no-op on CPU
    table = common.block_table_tensor[:n]
    host = table.cpu()
    tables = [host[i, :-(-c // block_size)].long() for i, c in enumerate(lens)]
    q_lens = [b - a for a, b in zip(loc, loc[1:])]
    num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), n)
    return AttnMetadata(
        num_reqs=n, num_decodes=num_decodes, num_actual_tokens=t, page_size=block_size,
        query_start_loc=common.query_start_loc[:n + 1], query_start_loc_cpu=loc,
        seq_lens=seq_lens, seq_lens_cpu=lens, block_table_tensor=table, block_tables_cpu=tables,
        slot_mapping=common.slot_mapping[:t].long(), req_slots_cpu=list(range(n)),
        page_runs=[page_runs(tb.tolist()) if len(tb) else () for tb in tables], rope_lens_cpu=lens)


def phases(meta: AttnMetadata) -> list[str]:
    """vLLM's runner has no phase: a request scoring one token is a decode (a one-token prompt
    tail after a prefix-cache hit attends the same way), any other is a prefill chunk."""
    return ["decode" if q == 1 else "prefill" for q in meta.q_lens_cpu]


def split_block_interior(kv_cache: torch.Tensor) -> LayerKV:
    """CPU_ATTN's [num_blocks, Hkv, block_size, 2 * D] buffer stores, per (block, head), the
    block's keys then its values: views [num_blocks, Hkv, block_size, D] of each, no copy."""
    nb, hkv, bs, d2 = kv_cache.shape
    k, v = kv_cache.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
    return LayerKV(k=k, v=v)


def split_token_interior(kv_cache: torch.Tensor) -> LayerKV:
    """TRITON_ATTN's [num_blocks, Hkv, block_size, 2 * D] buffer stores each token's key then
    its value: the two halves of the last dim."""
    k, v = kv_cache.split(kv_cache.shape[-1] // 2, dim=-1)
    return LayerKV(k=k, v=v)


def keep_side_tables(kv: LayerKV, allocated: set[str], specs: tuple[KVSpec, ...], key: torch.Tensor,
                     idx: WriteIndex) -> None:
    """vLLM has written this step's keys: bring the layer's side tables (kv.side) up to them.
    A table made on the first step starts empty; every page a request uses is then (re)started
    at offset 0, which resets its entry, and pages a prefix-cache hit reuses were kept current."""
    for spec in specs:
        if spec.name not in allocated:
            spec.allocate(kv, torch.zeros(kv.k.shape[0], dtype=torch.long, device=kv.k.device))
            allocated.add(spec.name)
        spec.on_write(kv, key, idx)
