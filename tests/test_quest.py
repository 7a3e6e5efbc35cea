"""Quest decode: page bounds, selection, and equality with dense attention at full budget."""
from __future__ import annotations

import pytest
import torch
from decode_cases import attended, backend, dense_out, keys, make_case, plant_heavy_key, write

from sparsekv.attention.page_select import attend_pages
from sparsekv.attention.quest import QuestParams, page_bounds
from sparsekv.cache.kv_cache import PAGE_BOUNDS, KVCache


def test_full_budget_is_dense_bit_for_bit():
    case = make_case([37, 300, 700])
    out, plan = case.run(backend("quest", budget=1024), layer=2)
    assert torch.equal(out, dense_out(case))
    assert attended(plan) == [n * 4 for n in case.lens]


def test_sparse_attends_budget_with_last_page():
    case = make_case([40, 700, 1000])
    be = backend("quest", budget=128)
    pages = be.select(case.q, case.kv, case.plan(be))
    assert pages[0] is None  # within the budget: dense
    for i in (1, 2):
        last = (case.lens[i] - 1) // 16
        assert pages[i].shape == (2, 8)
        for head in pages[i]:
            assert head.tolist() == sorted(set(head.tolist())) and head[-1] == last
    out, plan = case.run(be, layer=2)
    torch.testing.assert_close(out[0], dense_out(case)[0], rtol=1e-6, atol=1e-6)
    last_fill = [n - (n - 1) // 16 * 16 for n in case.lens]
    assert attended(plan) == [160, (112 + last_fill[1]) * 4, (112 + last_fill[2]) * 4]


@pytest.mark.parametrize("pos", [0, 5, 170, 333, 511, 640, 690])
def test_heavy_key_page_is_selected(pos):
    case = make_case([700], seed=pos)
    plant_heavy_key(case, 0, pos, head=1)
    be = backend("quest", budget=64)
    pages = be.select(case.q, case.kv, case.plan(be))[0]
    assert pos // 16 in pages[1].tolist()


def test_bounds_follow_writes_token_by_token():
    torch.manual_seed(0)
    ps, hkv, d = 4, 2, 8
    cache = KVCache(1, 6, ps, hkv, d, torch.float32, torch.device("cpu"), (PAGE_BOUNDS,))
    table = torch.tensor([4, 1, 5])
    ks = torch.randn(11, hkv, d)
    for n in range(1, 12):
        pos = n - 1
        slot = table[pos // ps] * ps + pos % ps
        write(cache, ks[pos:pos + 1], torch.randn(1, hkv, d), slot.view(1))
        for page in range((n + ps - 1) // ps):
            written = ks[page * ps:min(n, (page + 1) * ps)]
            assert torch.equal(cache.layers[0].kmin[table[page]], written.amin(0))
            assert torch.equal(cache.layers[0].kmax[table[page]], written.amax(0))


@pytest.mark.parametrize("seed", range(8))
def test_upper_bound_holds(seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, n, ps = 8, 2, 16, 12, 16
    q = torch.randn(hq, d, generator=g) * (1 + seed)
    k = torch.randn(n, ps, hkv, d, generator=g) * torch.rand(1, 1, 1, d, generator=g) * 3
    bound = page_bounds(q, k.amin(1), k.amax(1))  # [Hkv, n]
    true = torch.einsum("hgd,nthd->hgnt", q.view(hkv, -1, d), k).amax((1, 3))
    assert (bound >= true - 1e-4 * true.abs().clamp(min=1)).all()


def test_batched_equals_one_by_one():
    case = make_case([100, 600, 1500, 40, 333], seed=3)
    be = backend("quest", budget=96)
    together, plan = case.run(be, layer=3)
    for i in range(len(case.lens)):
        out, alone = case.run(be, layer=3, only=[i])
        torch.testing.assert_close(out[0], together[i], rtol=1e-6, atol=1e-6)
        assert attended(alone) == [attended(plan)[i]]


def test_attention_reads_only_selected_pages():
    case = make_case([500], seed=4)
    be = backend("quest", budget=64)
    pages = be.select(case.q, case.kv, case.plan(be))[0]
    out, pairs = attend_pages(case.q, case.kv, case.tables, torch.tensor(case.lens), pages.unsqueeze(0),
                              case.scale)
    k = keys(case, 0)
    ref = []
    for h in range(2):
        idx = torch.cat([torch.arange(p * 16, min(p * 16 + 16, 500)) for p in pages[h].tolist()])
        qh = case.q[0, 2 * h:2 * h + 2]
        v = case.kv.v[case.tables[0][idx // 16], h, idx % 16]
        ref.append(torch.softmax(qh @ k[h, idx].T * case.scale, -1) @ v)
    torch.testing.assert_close(out[0], torch.cat(ref), rtol=1e-5, atol=1e-6)
    assert pairs.item() == sum(len(pages[h]) * 16 - (16 - 500 % 16) for h in range(2)) * 2


def test_coarser_pages_and_validation():
    case = make_case([900], seed=5)
    be = backend("quest", budget=96, page_size=32)
    pages = be.select(case.q, case.kv, case.plan(be))[0]
    pairs = pages.view(2, 3, 2)  # 900 tokens = 57 pool pages: the last 32-token page is pool page 56 alone
    assert (pairs[..., 0] % 2 == 0).all() and (pairs[:, -1] == torch.tensor([56, -1])).all()
    assert (pairs[:, :-1, 1] == pairs[:, :-1, 0] + 1).all()
    with pytest.raises(ValueError, match="multiple"):
        case.run(backend("quest", budget=96, page_size=24), layer=2)
    with pytest.raises(ValueError, match="3 pages"):
        QuestParams(budget=32)


@pytest.mark.parametrize("page_size", [16, 32])
def test_compiled_selection_equals_pytorch(page_size):
    """The compiled CPU op (bounds, grouping, forced last page, top-k, lists) picks the pages of
    the PyTorch rule and counts the tokens they hold; the step's output is attention over them
    (and dense for the request within the budget)."""
    from sparsekv.attention.kernels import cpu_decode
    from sparsekv.attention.page_select import token_mask

    if not cpu_decode.available():
        pytest.skip("no compiler for the CPU kernels here")
    case = make_case([700, 100, 1000, 333, 2000], d=32, seed=6)  # d 32: a head dim the kernels compile
    be = backend("quest", budget=128, page_size=page_size)
    plan = case.plan(be)
    lists, tokens = be.choose(case.q, case.kv, plan)
    want = be.ranked(case.q, case.kv, plan)
    assert lists.dtype == torch.int32 and torch.equal(lists.long(), want)
    lens = torch.tensor([case.lens[i] for i in plan.active])
    assert tokens.tolist() == token_mask(want, 16, lens).sum((1, 2)).tolist()
    out, plan = case.run(be, layer=2)
    ref, pairs = attend_pages(case.q[plan.active], case.kv, [case.tables[i] for i in plan.active], lens, want,
                              case.scale)
    torch.testing.assert_close(out[plan.active], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], dense_out(case)[1], rtol=1e-6, atol=1e-6)
    assert attended(plan) == [pairs.tolist()[plan.active.index(i)] if i in plan.active else 100 * 4
                              for i in range(5)]
