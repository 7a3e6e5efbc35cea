"""Eviction scores from attention probabilities, per KV head (PyTorch; runs on the pool's device).

H2O accumulates, per key, the softmax mass every query has given it (prefill rows, then each
decode step). SnapKV scores the prefix by the last `window` prompt queries, GQA-reduced and
pooled along tokens so that a selected token brings its neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_BLOCK = 256  # query rows per block: bounds the [Hq, rows, L] probability buffer


def attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, q_offset: int) -> torch.Tensor:
    """Sum over q's rows of the causal softmax probabilities each key receives, per query head.

    q [n, Hq, D] are the queries at key indices q_offset .. q_offset + n - 1; k [Hkv, Lk, D]
    -> float32 [Hq, Lk].
    """
    n, hq, d = q.shape
    hkv, lk = k.shape[0], k.shape[1]
    out = torch.zeros(hq, lk, dtype=torch.float32, device=q.device)
    keys = torch.arange(lk, device=q.device)
    for lo in range(0, n, ROW_BLOCK):
        rows = q[lo:lo + ROW_BLOCK]
        qg = rows.permute(1, 0, 2).reshape(hkv, -1, d)  # [Hkv, G * r, D]
        s = torch.matmul(qg, k.transpose(1, 2)).float().mul_(scale).view(hq, rows.shape[0], lk)
        at = torch.arange(q_offset + lo, q_offset + lo + rows.shape[0], device=q.device)
        s.masked_fill_(keys.view(1, 1, -1) > at.view(1, -1, 1), float("-inf"))
        out += torch.softmax(s, dim=-1).sum(1)
    return out


def reduce_heads(x: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """[Hq, L] -> [Hkv, L] over each KV head's query group (sum, mean or max)."""
    g = x.view(num_kv_heads, -1, x.shape[-1])
    return g.amax(1) if how == "max" else g.mean(1) if how == "mean" else g.sum(1)


def pool_tokens(x: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """1-D pooling along tokens, same length (kernel odd), as SnapKV smooths its scores."""
    if kernel == 1:
        return x
    pool = F.max_pool1d if how == "max" else F.avg_pool1d
    kw = {} if how == "max" else {"count_include_pad": False}
    return pool(x.unsqueeze(0), kernel, stride=1, padding=kernel // 2, **kw).squeeze(0)


def window_scores(q_window: torch.Tensor, k: torch.Tensor, scale: float, params) -> torch.Tensor:
    """SnapKV's prefix scores [Hkv, Lk] from the observation window's queries (the last rows)."""
    mass = attention_mass(q_window, k, scale, k.shape[1] - q_window.shape[0])
    return pool_tokens(reduce_heads(mass, k.shape[0], params.gqa), params.pool_kernel, params.pool)
