"""Synthetic attention inputs with realistic structure, in a paged pool, for the benchmarks."""
from __future__ import annotations

import math

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16  # Llama-3-8B heads; the engine's default page size


def synthetic_qkv(length: int, seed: int, dtype, device):
    """q [L, Hq, D], k and v [Hkv, L, D].

    Per KV head, a moving average of noise over the head's band width (64..512 tokens) is shared
    by its keys and queries, so q_t.k_s falls off linearly with |t - s|; the first 4 keys (the
    sink) and 16 random keys carry large components along directions all the head's queries share.
    The band's weight in the queries (1.5 for the narrowest band down to 1.0 for the widest) mixes
    peaked heads with diffuse ones: at threshold 0.9 XAttention keeps ~10% of blocks at 16K and
    ~17% at 32K (the paper reports ~20% on RULER).
    """
    import torch
    from torch.nn.functional import normalize

    g = torch.Generator().manual_seed(seed)
    group = HQ // HKV
    q = torch.empty(length, HQ, HEAD_DIM, dtype=dtype)
    k = torch.empty(HKV, length, HEAD_DIM, dtype=dtype)
    v = torch.randn(HKV, length, HEAD_DIM, generator=g).to(dtype)
    sink = normalize(torch.randn(HEAD_DIM, generator=g), dim=0)
    widths, weights = torch.linspace(64, 512, HKV).long().tolist(), torch.linspace(1.5, 1.0, HKV).tolist()
    for h, (width, weight) in enumerate(zip(widths, weights)):
        walk = torch.randn(length + width, HEAD_DIM, generator=g).cumsum(0)
        band = (walk[width:] - walk[:-width]) / math.sqrt(width)
        heavy = normalize(torch.randn(HEAD_DIM, generator=g), dim=0)
        kh = band + 0.5 * torch.randn(length, HEAD_DIM, generator=g)
        kh[:4] += 30 * sink
        kh[torch.randint(0, length, (16,), generator=g)] += 30 * heavy
        k[h] = kh
        for j in range(group):
            share = weight * (0.5 + 0.4 * float(torch.rand(1, generator=g)))
            noise = 0.5 * torch.randn(length, HEAD_DIM, generator=g)
            q[:, h * group + j] = share * band + noise + 4 * sink + 3.5 * heavy
    return q.to(device), k.to(device), v.to(device)


def paged_pool(k, v):
    """LayerKV with k, v [Hkv, L, D] in consecutive pages, plus the per-page key bounds."""
    import torch

    from sparsekv.cache.kv_cache import LayerKV

    hkv, length, d = k.shape
    n = -(-length // PAGE)
    pad = torch.zeros(hkv, n * PAGE - length, d, dtype=k.dtype, device=k.device)
    # head-major storage, as the engine's KVCache allocates it (LayerKV.allocate)
    kp, vp = (torch.cat([x, pad], 1).view(hkv, n, PAGE, d).transpose(0, 1) for x in (k, v))
    tail = (torch.arange(n * PAGE, device=k.device) >= length).view(1, n, PAGE, 1)
    kh = kp.transpose(0, 1)  # [Hkv, n, PAGE, D]; bounds stored head-major like the keys
    kmin = kh.masked_fill(tail, float("inf")).amin(2).transpose(0, 1)
    kmax = kh.masked_fill(tail, float("-inf")).amax(2).transpose(0, 1)
    return LayerKV(kp, vp, {"kmin": kmin, "kmax": kmax})
