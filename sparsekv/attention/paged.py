"""Reading a sequence's keys and values out of the paged pool (PyTorch path)."""
from __future__ import annotations

import torch

from sparsekv.attention.backend import LayerKV


def gather_kv(kv: LayerKV, block_table: torch.Tensor, context_len: int,
              first_page: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens [0, context_len) as [Hkv, context_len, D] tensors.

    In a head-major pool (LayerKV.allocate) consecutive pages are read in place, without a
    copy; other block tables cost one gather. `first_page` (SeqAttn.first_page) spares the check.
    """
    ps = kv.page_size
    n = (context_len + ps - 1) // ps
    if first_page is None:
        ids = block_table[:n]
        first_page = int(ids[0]) if n == 1 or bool((ids[1:] - ids[:-1] == 1).all()) else -1
    flat = kv.token_major()
    if first_page >= 0 and flat is not None:
        start = first_page * ps
        return flat[0][:, start:start + context_len], flat[1][:, start:start + context_len]
    kh, vh = kv.k.transpose(0, 1), kv.v.transpose(0, 1)  # [Hkv, num_pages, ps, D]
    if first_page >= 0:
        k, v = kh[:, first_page:first_page + n], vh[:, first_page:first_page + n]
    else:
        k, v = kh[:, block_table[:n]], vh[:, block_table[:n]]
    hkv, d = k.shape[0], k.shape[3]
    return k.reshape(hkv, n * ps, d)[:, :context_len], v.reshape(hkv, n * ps, d)[:, :context_len]


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
