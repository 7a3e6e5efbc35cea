"""Triton paged decode and page scoring under the interpreter (float32, small shapes) against
the PyTorch path. The interpreter must be chosen before triton is imported."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from decode_cases import attended, backend, dense_out, keys, make_case  # noqa: E402

from sparsekv.attention.delta import page_mass  # noqa: E402
from sparsekv.attention.kernels.decode import paged_decode  # noqa: E402
from sparsekv.attention.kernels.page_score import delta_page_scores, quest_page_scores  # noqa: E402
from sparsekv.attention.page_select import attend_pages  # noqa: E402
from sparsekv.attention.quest import page_bounds  # noqa: E402

LENS = [300, 40, 177, 16]


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (6, 3, 24), (2, 2, 32)])
def test_dense_decode_matches_pytorch(hq, hkv, d):
    case = make_case(LENS, hq=hq, hkv=hkv, d=d)
    group = case.plan(backend("dense")).group
    out, lse = paged_decode(case.q, case.kv, group, case.scale, return_lse=True)
    torch.testing.assert_close(out, dense_out(case), rtol=1e-5, atol=1e-5)
    for i in range(len(LENS)):
        k = keys(case, i)
        logits = case.q[i].view(hkv, -1, d) @ k.transpose(1, 2) * case.scale
        torch.testing.assert_close(lse[i], torch.logsumexp(logits, -1).flatten(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("listed", [False, True])
def test_row_lens_match_pytorch(listed):
    """Per-(sequence, KV head) row lengths (eviction's per-layer/per-head budgets): empty rows,
    starts mid-page and on page boundaries, with and without page lists."""
    from sparsekv.attention.dense import dense_decode_torch

    case = make_case(LENS, hq=6, hkv=3, d=16, seed=5)
    rows = [torch.tensor([[300, 1, 130]]), torch.tensor([[0, 40, 17]]), None, torch.tensor([[16, 3, 16]])]
    group = case.plan(backend("dense"), num_layers=1, row_lens=rows).group
    lists = None
    if listed:  # every page, newest first, so the result is the dense one
        lists = torch.full((len(LENS), 3, 19), -1, dtype=torch.long)
        for i, n in enumerate(LENS):
            lists[i, :, :-(-n // 16)] = torch.arange(-(-n // 16)).flip(0)
    out = paged_decode(case.q, case.kv, group, case.scale, page_lists=lists, row_lens=group.row_lens(0))
    torch.testing.assert_close(out, dense_decode_torch(case.q, case.kv, group, case.scale), rtol=1e-5, atol=1e-5)


def test_page_lists_match_pytorch():
    case = make_case(LENS, seed=1)
    g = torch.Generator().manual_seed(1)
    lists = torch.full((len(LENS), 2, 12), -1, dtype=torch.long)
    for i, n in enumerate(LENS):
        pages = -(-n // 16)
        for h in range(2):
            chosen = torch.randperm(pages, generator=g)[:min(pages, 7)].sort().values
            lists[i, h, :len(chosen)] = chosen
    out = paged_decode(case.q, case.kv, case.plan(backend("dense")).group, case.scale, page_lists=lists)
    ref, _ = attend_pages(case.q, case.kv, case.tables, torch.tensor(LENS), lists, case.scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shared_page_list_expanded_over_heads():
    case = make_case([500], seed=2)
    lists = torch.tensor([[0, 3, 4, 9, 20, 31]]).expand(2, -1).unsqueeze(0)  # stride 0 over heads
    out = paged_decode(case.q, case.kv, case.plan(backend("dense")).group, case.scale, page_lists=lists)
    ref, _ = attend_pages(case.q, case.kv, case.tables, torch.tensor([500]), lists, case.scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_are_upcast_before_dot():
    """Regression: the interpreter's tl.dot on bf16 gives garbage; the kernels upcast first."""
    case = make_case([200, 90], dtype=torch.bfloat16, seed=3)
    out = paged_decode(case.q, case.kv, case.plan(backend("dense")).group, case.scale)
    torch.testing.assert_close(out.float(), dense_out(case).float(), rtol=2e-2, atol=2e-2)


def test_quest_scores_match_pytorch():
    case = make_case(LENS, hq=8, hkv=2, seed=4)
    scores = quest_page_scores(case.q, case.kv, case.plan(backend("quest")).group)
    for i, n in enumerate(LENS):
        ids = case.tables[i]
        ref = page_bounds(case.q[i], case.kv.kmin[ids], case.kv.kmax[ids])
        torch.testing.assert_close(scores[i, :, :len(ids)], ref, rtol=1e-5, atol=1e-4)
        assert torch.isinf(scores[i, :, len(ids):]).all()


@pytest.mark.parametrize("per_group", [False, True])
def test_delta_scores_match_pytorch(per_group):
    case = make_case(LENS, seed=5)
    group = case.plan(backend("dense")).group
    _, lse = paged_decode(case.q, case.kv, group, case.scale, return_lse=True)
    scores = delta_page_scores(case.q, case.kv, group, case.scale, lse, per_group)
    for i, n in enumerate(LENS):
        k = keys(case, i)
        probs = torch.softmax(case.q[i].view(2, 2, -1) @ k.transpose(1, 2) * case.scale, -1)
        ref = page_mass(probs, 16, "group" if per_group else "all")
        torch.testing.assert_close(scores[i, :, :ref.shape[1]], ref, rtol=1e-5, atol=1e-6)
        assert (scores[i, :, ref.shape[1]:] == 0).all()


def test_backends_through_triton_match_pytorch():
    """Each method's CUDA implementation (Triton, interpreted on CPU tensors) against its CPU one."""
    case = make_case([300, 40, 177, 520], seed=6)
    runs = {}
    for device in ("cpu", "cuda"):
        for name, params in (("quest", dict(budget=64)),
                             ("delta", dict(delta_layers=(2, 4), budget=64, recent_pages=1)),
                             ("delta", dict(delta_layers=(2,), budget=96, page_size=32, recent_pages=1,
                                            head_reduce="group"))):
            be = backend(name, device, **params)
            plan = case.plan(be)
            for layer in range(2, 6):
                before = attended(plan)
                out, _ = case.run(be, layer, plan)
                pairs = [a - b for a, b in zip(attended(plan), before)]
                runs.setdefault((name, str(params), layer), []).append((out, pairs))
    for key, ((a, att_a), (b, att_b)) in runs.items():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=str(key))
        assert att_a == att_b, key


def test_full_budget_triton_is_dense():
    case = make_case(LENS, seed=7)
    for name in ("quest", "delta"):
        out, _ = case.run(backend(name, "cuda", budget=1024), layer=3)
        torch.testing.assert_close(out, dense_out(case), rtol=1e-5, atol=1e-5)
