"""Eviction's parts against brute force: H2O's accumulated mass, SnapKV's pooled window scores,
PyramidKV's and AdaKV's budgets, and compaction in the paged pool (side tables included)."""
from __future__ import annotations

import pytest
import torch

from sparsekv.attention.paged import gather_kv
from sparsekv.cache.kv_cache import PAGE_BOUNDS, KVCache, WriteIndex
from sparsekv.evict.compact import compact
from sparsekv.evict.params import AdaKVParams, SnapKVParams, ada_budgets, pyramid_budgets
from sparsekv.evict.scores import attention_mass, window_scores


def brute_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[Hq, n, Lk] causal softmax of the last n positions, K/V heads repeated."""
    n, hq, _ = q.shape
    lk = k.shape[1]
    kr = k.repeat_interleave(hq // k.shape[0], 0)
    s = torch.einsum("nhd,hld->hnl", q.double(), kr.double()) * scale
    mask = torch.arange(lk).view(1, -1) > torch.arange(lk - n, lk).view(-1, 1)
    return torch.softmax(s.masked_fill(mask, float("-inf")), -1)


def test_h2o_mass_accumulated_over_chunks_matches_brute_force():
    torch.manual_seed(0)
    q, k = torch.randn(300, 4, 16), torch.randn(2, 300, 16)
    acc = torch.zeros(4, 300)
    for lo, hi in ((0, 70), (70, 71), (71, 300)):  # chunks, then a decode-sized step
        acc[:, :hi] += attention_mass(q[lo:hi], k[:, :hi], 0.25, lo)
    torch.testing.assert_close(acc.double(), brute_probs(q, k, 0.25).sum(1), rtol=1e-5, atol=1e-5)


def test_snapkv_scores_and_selection_match_brute_force():
    torch.manual_seed(1)
    p = SnapKVParams(window=8, pool_kernel=5, pool="max", gqa="mean")
    q, k = torch.randn(8, 4, 16), torch.randn(2, 100, 16)
    got = window_scores(q, k, 0.25, p)
    mass = brute_probs(q, k, 0.25).sum(1).view(2, 2, 100).mean(1)
    want = torch.tensor([[float(mass[h, max(0, i - 2):i + 3].max()) for i in range(100)] for h in range(2)],
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, :92].topk(20).indices.sort().values, want[:, :92].topk(20).indices.sort().values)


def test_pyramid_budgets_fall_with_depth_and_keep_the_mean():
    for mean, layers in ((1024 - 8, 30), (56, 4), (7, 5)):
        b = pyramid_budgets(mean, 20.0, layers)
        assert int(b.sum()) == layers * mean
        assert all(int(x) >= int(y) for x, y in zip(b, b[1:]))
        assert int(b[0]) >= mean >= int(b[-1]) >= int(mean / 20)


def test_adakv_shares_the_layer_budget_by_score():
    torch.manual_seed(2)
    scores = torch.rand(3, 4, 200)
    scores[:, 1] += 1.0  # head 1 holds the heavy tokens
    free = torch.ones_like(scores, dtype=torch.bool)
    b = ada_budgets(scores, free, 40, 0.2)
    assert (b.sum(1) == 4 * 40).all() and (b >= 8).all()
    assert (b[:, 1] == b.max(1).values).all() and (b[:, 1] > 40).all()
    assert (AdaKVParams().row_budgets(72, scores, free, 32) == b + 32).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_compact_moves_kept_tokens_and_refreshes_page_bounds(per_row):
    """Each row's kept tokens end up in slots [start, n) (start 0, or n minus the row's own count:
    right-aligned), with their positions; the written pages' bounds are recomputed."""
    torch.manual_seed(3)
    cache = KVCache(2, 12, 4, 2, 8, torch.float32, torch.device("cpu"), (PAGE_BOUNDS,))
    table, K, n = [7, 2, 9, 4, 11, 0], 22, 9
    slots = torch.tensor([table[s // 4] * 4 + s % 4 for s in range(K)])
    idx = WriteIndex.from_slots(slots, 4)
    cache.begin_step(idx)
    for layer in range(2):
        cache.write(layer, torch.randn(K, 2, 8), torch.randn(K, 2, 8), idx)
    before = [gather_kv(kv, torch.tensor(table), K) for kv in cache.layers]
    counts = torch.tensor([[9, 3], [6, 9]]) if per_row else torch.full((2, 2), n)
    keep = torch.zeros(2, 2, K, dtype=torch.bool)
    for layer in range(2):
        for h in range(2):
            keep[layer, h, torch.randperm(K)[:int(counts[layer, h])]] = True
    starts = n - counts if per_row else None
    pos = torch.arange(K).repeat(2, 2, 1)
    first = compact(cache, table, keep, n, (pos,), starts)
    assert first is not None
    for layer, kv in enumerate(cache.layers):
        k, v = gather_kv(kv, torch.tensor(table), n)
        for h in range(2):
            lo = n - int(counts[layer, h])
            kept = keep[layer, h].nonzero().flatten()
            assert torch.equal(pos[layer, h, lo:n].sort().values, kept)  # positions moved with the tokens
            assert torch.equal(k[h, lo:], before[layer][0][h, pos[layer, h, lo:n]])
            assert torch.equal(v[h, lo:], before[layer][1][h, pos[layer, h, lo:n]])
        for p in range((n - 1) // 4 + 1):  # the bounds of every written page equal a fresh computation
            rows = k[:, p * 4:min(n, p * 4 + 4)]
            assert torch.equal(kv.kmin[table[p]], rows.amin(1)) and torch.equal(kv.kmax[table[p]], rows.amax(1))
