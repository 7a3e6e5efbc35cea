"""Reading a sequence's keys and values out of the paged pool (PyTorch path)."""
from __future__ import annotations

from typing import Iterator

import torch

from sparsekv.attention.metadata import BatchGroup, page_runs
from sparsekv.cache.kv_cache import LayerKV


def gather_kv(kv: LayerKV, block_table: torch.Tensor, context_len: int,
              runs: tuple[tuple[int, int], ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens [0, context_len) as [Hkv, context_len, D] tensors.

    In a head-major pool (LayerKV.allocate) consecutive pages are read in place, without a
    copy; other block tables cost one gather. `runs` (BatchGroup.page_runs) spares the check.
    """
    n = (context_len + kv.page_size - 1) // kv.page_size
    runs = runs or page_runs(block_table[:n].tolist())
    return kv_segments(kv, block_table, context_len, runs, min_run=1 if len(runs) == 1 else n + 1)[0]


def request_kv(kv: LayerKV, group: BatchGroup) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per request of a prefill group: its q rows and its keys and values [Hkv, context_len, D]
    (read in place where its pages are consecutive)."""
    for i, (start, n) in enumerate(zip(group.query_start_cpu, group.q_lens_cpu)):
        k, v = gather_kv(kv, group.block_tables_cpu[i], group.seq_lens_cpu[i], group.page_runs[i])
        yield slice(start, start + n), k, v


def kv_segments(kv: LayerKV, block_table: torch.Tensor, context_len: int,
                runs: tuple[tuple[int, int], ...] | None = None,
                min_run: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Tokens [0, context_len) as [Hkv, L_i, D] (k, v) segments in logical order: runs of at
    least `min_run` consecutive pages are read in place from a head-major pool, the pages in
    between are gathered together. Decode over the segments reads each long run once, with no
    copy, where one gather would copy the whole context every layer."""
    ps = kv.page_size
    n = (context_len + ps - 1) // ps
    if runs is None:
        runs = page_runs(block_table[:n].tolist())
    flat = kv.token_major()
    segs: list[tuple[torch.Tensor, torch.Tensor]] = []
    kh, vh = kv.k.transpose(0, 1), kv.v.transpose(0, 1)  # [Hkv, num_pages, ps, D]
    hkv, d = kh.shape[0], kh.shape[3]
    pending, logical = 0, 0  # pending: logical pages not yet in a segment

    def gather(lo: int, hi: int) -> None:
        end = min(hi * ps, context_len) - lo * ps
        ids = block_table[lo:hi]
        segs.append((kh[:, ids].reshape(hkv, -1, d)[:, :end], vh[:, ids].reshape(hkv, -1, d)[:, :end]))

    for first, count in runs:
        if flat is not None and count >= min_run:
            if logical > pending:
                gather(pending, logical)
            start, end = first * ps, first * ps + min(count * ps, context_len - logical * ps)
            segs.append((flat[0][:, start:end], flat[1][:, start:end]))
            pending = logical + count
        logical += count
    if logical > pending:
        gather(pending, logical)
    return segs


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     return_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per head against contiguous keys, GQA without repeating K/V.

    q: [Hq, D]; k, v: [Hkv, L, D] -> [Hq, D]. A manual matmul-softmax: on CPU it runs near the
    memory bandwidth where SDPA with one query and GQA is several times slower. With
    return_probs, also the float32 probabilities [Hkv, G, L] (DELTA scores pages from them).
    """
    hq, d = q.shape
    hkv = k.shape[0]
    qg = q.view(hkv, hq // hkv, d)
    s = torch.matmul(qg, k.transpose(1, 2)).float() * scale  # [Hkv, G, L]
    probs = torch.softmax(s, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v).reshape(hq, d)
    return (out, probs) if return_probs else out


def decode_segments(q: torch.Tensor, segs: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                    return_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """decode_attention over keys split in segments (kv_segments): one softmax over all."""
    if len(segs) == 1:
        return decode_attention(q, *segs[0], scale, return_probs)
    hq, d = q.shape
    hkv = segs[0][0].shape[0]
    qg = q.view(hkv, hq // hkv, d)
    s = torch.cat([torch.matmul(qg, k.transpose(1, 2)) for k, _ in segs], dim=-1).float() * scale
    probs = torch.softmax(s, dim=-1)
    p = probs.to(segs[0][1].dtype)
    out, at = None, 0
    for _, v in segs:
        part = torch.matmul(p[..., at:at + v.shape[1]], v)
        out = part if out is None else out + part
        at += v.shape[1]
    out = out.reshape(hq, d)
    return (out, probs) if return_probs else out


def decode_rows(q: torch.Tensor, segs: list[tuple[torch.Tensor, torch.Tensor]], firsts: list[int],
                scale: float) -> torch.Tensor:
    """decode_segments where KV head h reads only positions firsts[h] on (per-row lengths of
    eviction): each head's own slice of the segments, so the skipped keys are never read; a
    head with nothing to read gives zeros, as the kernels do."""
    hkv = segs[0][0].shape[0]
    g = q.shape[0] // hkv
    out = torch.zeros_like(q)
    for h, first in enumerate(firsts):
        part, at = [], 0
        for k, v in segs:
            lo = max(0, first - at)
            if lo < k.shape[1]:
                part.append((k[h:h + 1, lo:], v[h:h + 1, lo:]))
            at += k.shape[1]
        if part:
            out[h * g:(h + 1) * g] = decode_segments(q[h * g:(h + 1) * g], part, scale)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last Lq positions over Lk keys (Lq <= Lk), GQA.

    q: [Lq, Hq, D]; k, v: [Hkv, Lk, D] -> [Lq, Hq, D].
    """
    lq, hq, _ = q.shape
    lk = k.shape[1]
    # 4-D inputs: with 3-D ones CPU SDPA falls back to its slow math kernel (measured 4x)
    qh, k, v = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    gqa = hq != k.shape[1]
    if lq == lk:
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        rows = torch.arange(lk - lq, lk, device=q.device).unsqueeze(1)
        mask = torch.arange(lk, device=q.device).unsqueeze(0) <= rows
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
