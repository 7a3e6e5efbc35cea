"""HiP / InfiniteHiP (PyTorch path): the tree search and the stages, block-sparse prefill against
dense attention under the equivalent token mask, decode mask caching, and the parameters."""
import math

import pytest
import torch
from decode_cases import attended, backend, dense_out, make_case, plant_heavy_key
from prefill_cases import Seq, run_prefill

from sparsekv.attention.backend import get_backend
from sparsekv.attention.hip_plan import HiPParams, prefill_lists
from sparsekv.attention.page_select import attend_pages
from sparsekv.attention.hip_search import stage_search, top1_scores, torch_probe, tree_rounds, tree_search
from sparsekv.attention.paged import gather_kv
from sparsekv.attention.xattention_select import BlockGeometry
from sparsekv.cache.kv_cache import LayerKV

HQ, HKV, D, PAGE = 4, 2, 16, 16
SMALL = dict(mask_k=64, block_size_q=32, block_size_k=4, sliding_window=64, sink=8)
STAGED = dict(SMALL, block_size_k=8, stages=((64, 256), (8, 64)), refresh_interval=(8, 4))


def _pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerKV(torch.randn(64, HKV, PAGE, D, generator=g), torch.randn(64, HKV, PAGE, D, generator=g))


def _counting(probe):
    calls = []

    def wrapped(starts, width):
        calls.append((starts.shape[1], width))
        return probe(starts, width)
    return wrapped, calls


def _token_mask(lists, counts, geom, p, hq, hkv):
    """[Hq, q_len, ctx] token mask of the lists, causal."""
    bq, bk, nqb = p.block_size_q, p.block_size_k, geom.num_qblocks
    group, shared = hq // hkv, p.gqa_mode == "group_max"
    blocks = torch.zeros(lists.shape[0], geom.num_kblocks * bq // bk, dtype=torch.bool)
    for u in range(lists.shape[0]):
        blocks[u, lists[u, :counts[u]]] = True
    blocks = blocks.view(-1, nqb, blocks.shape[1])
    if shared:
        blocks = blocks.repeat_interleave(group, 0)
    pos = torch.arange(geom.q_first, geom.context_len)
    keys = torch.arange(geom.context_len)
    tok = blocks[:, pos // bq - geom.first_block][:, :, keys // bk]
    return tok & (keys.view(1, -1) <= pos.view(-1, 1))


def _masked_dense(q, k, v, mask, scale):
    kk, vv = (x.repeat_interleave(q.shape[1] // k.shape[0], 0) for x in (k, v))
    s = (q.transpose(0, 1) @ kk.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(0, 1)


@pytest.mark.parametrize("params", [SMALL, dict(SMALL, gqa_mode="group_max"), STAGED,
                                    dict(SMALL, representative="first")])
@pytest.mark.parametrize("q_len", [700, 300])
def test_block_sparse_prefill_equals_masked_dense(params, q_len):
    kv, p = _pool(), HiPParams(**params)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(q_len, HQ, D, generator=g)
    table = torch.randperm(64, generator=g)[:44]
    seq = Seq(0, q_len, 700, table)
    out = run_prefill(get_backend("hip", p), q, kv, [seq], D ** -0.5)
    k, v = gather_kv(kv, table, 700)
    geom = BlockGeometry(p.block_size_q, q_len, 700)
    kp = torch.nn.functional.pad(k, (0, 0, 0, geom.num_kblocks * p.block_size_q - 700))
    lists, counts, _, pairs = prefill_lists(p, q, geom, HKV, lambda qs, u: torch_probe(qs, kp, u))
    mask = _token_mask(lists, counts, geom, p, HQ, HKV)
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask, D ** -0.5), rtol=1e-5, atol=1e-5)
    assert seq.attended == int(pairs) == int(mask.sum()) < seq.causal_pairs * HQ
    # sink and window: every query sees the first `sink` keys and the `sliding_window` before its block
    pos = torch.arange(700 - q_len, 700)
    keys = torch.arange(700).view(1, -1)
    must = (keys < p.sink) | (keys >= (pos // p.block_size_q * p.block_size_q - p.sliding_window).view(-1, 1))
    assert mask[:, must & (keys <= pos.view(-1, 1))].all()


@pytest.mark.parametrize("params", [dict(SMALL, mask_k=1024), dict(STAGED, mask_k=1024,
                                                                   stages=((64, 4096), (8, 1024)))])
def test_full_budget_is_dense_exactly(params):
    kv = _pool()
    q = torch.randn(700, HQ, D)
    seqs = [Seq(0, 700, 700, torch.arange(44))]
    out = run_prefill(get_backend("hip", HiPParams(**params)), q, kv, seqs, D ** -0.5)
    pairs = seqs[0].attended
    assert torch.equal(out, run_prefill(get_backend("dense", HiPParams.__base__()), q, kv, seqs, D ** -0.5))
    assert pairs == seqs[0].causal_pairs * HQ
    case = make_case([37, 300, 700])
    out, plan = case.run(backend("hip", **params), layer=2)
    assert torch.equal(out, dense_out(case)) and attended(plan) == [n * HQ for n in case.lens]


def _needle_case(pos, seed):
    """Every unit's queries share a direction; the needle key points along it and its neighbours
    less so the farther they are (the attention locality HiP's search relies on)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    qs = torch.randn(6, 8, D, generator=g) + 2 * direction
    k = torch.randn(1, 1024, D, generator=g)
    bump = (1 - (torch.arange(1024) - pos).abs() / 128).clamp(min=0)
    k[0] += 40 * bump.view(-1, 1) * direction
    return qs, k


@pytest.mark.parametrize("pos", [16, 99, 260, 511, 700, 1001])
def test_planted_needle_block_is_always_kept(pos):
    qs, k = _needle_case(pos, pos)
    probe = torch_probe(qs, k, torch.zeros(6, dtype=torch.long))
    lo, hi = torch.full((6,), 4), torch.full((6,), 256)  # blocks of 4 tokens: tokens [16, 1024)
    for rep in ("first", "center"):
        blocks, _ = tree_search(probe, lo, hi, 8, 4, rep)
        assert (blocks == pos // 4).any(1).all()
        for stages in ([(64, 256), (8, 32)], [(128, 512), (32, 128), (4, 32)]):
            s, e = stage_search(probe, lo * 4, hi * 4, stages, rep)[-1]
            assert ((s <= pos) & (pos < e)).any(1).all()


@pytest.mark.parametrize("n,keep", [(1000, 8), (256, 16), (17, 16), (16, 16), (5, 16), (1 << 12, 1)])
def test_tree_rounds_and_kept_nodes(n, keep):
    qs, k = torch.randn(3, 4, D), torch.randn(1, n * 2, D)
    probe, calls = _counting(torch_probe(qs, k, torch.zeros(3, dtype=torch.long)))
    blocks, rounds = tree_search(probe, torch.zeros(3, dtype=torch.long), torch.full((3,), n), keep, 2, "center")
    assert rounds == len(calls) == max(0, math.ceil(math.log2(n / keep)))
    assert all(c == (2 * keep, 2) for c in calls)
    for row in blocks.tolist():
        real = [b for b in row if b >= 0]
        assert len(real) == min(n, keep) and real == sorted(set(real)) and all(0 <= b < n for b in real)
    if n <= keep:
        assert blocks[:, :n].tolist() == [list(range(n))] * 3
    assert tree_rounds(n, keep) == rounds


@pytest.mark.parametrize("chunk", [8, 32, 64])
@pytest.mark.parametrize("peak", [0, 5, 31, 63])
@pytest.mark.parametrize("shape", ["peak", "rising", "falling"])
def test_hierarchical_top1_finds_the_argmax(chunk, peak, shape):
    """Center probes find the peak of a symmetric unimodal chunk; any probe finds a monotone one's."""
    peak = {"peak": min(peak, chunk - 1), "rising": chunk - 1, "falling": 0}[shape]
    score = -(torch.arange(chunk) - peak).abs().float()
    for rep in ("center",) if shape == "peak" else ("first", "center"):
        probe, calls = _counting(lambda s, w: torch.where(s >= 0, score[s.clamp(min=0)], float("-inf")))
        got = top1_scores(probe, torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), chunk), chunk, rep)
        assert float(got) == 0.0 and len(calls) == math.log2(chunk) and all(c == (2, 1) for c in calls)


def test_stages_are_nested_and_shrink():
    g = torch.Generator().manual_seed(0)
    qs, k = torch.randn(4, 8, D, generator=g), torch.randn(2, 4096, D, generator=g)
    probe = torch_probe(qs, k, torch.tensor([0, 0, 1, 1]))
    outs = stage_search(probe, torch.full((4,), 64), torch.full((4,), 4000), [(256, 1024), (32, 256), (8, 64)],
                        "center")
    assert [o[0].shape[1] for o in outs] == [4, 8, 8]
    for (ps, pe), (s, e) in zip(outs, outs[1:]):
        inside = (s.unsqueeze(-1) >= ps.unsqueeze(1)) & (e.unsqueeze(-1) <= pe.unsqueeze(1))
        assert inside.any(-1).all()
    again = stage_search(probe, torch.full((4,), 64), torch.full((4,), 4000), [(256, 1024), (32, 256), (8, 64)],
                         "center", start=2, cached=outs)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, outs))


@pytest.mark.parametrize("d", [16, 32])  # 32: the compiled CPU kernel's page lists (where it builds)
def test_decode_masks_are_cached_and_refreshed(d):
    params = dict(SMALL, refresh_interval=(4,))
    case = make_case([900], seed=2, d=d)
    be = backend("hip", **params)
    be.free([0])
    probed = []
    orig = be.decode_probe
    be.decode_probe = lambda qs, *a: (probed.append((case.lens[0], qs.shape[1])), orig(qs, *a))[1]
    try:
        for step in range(9):
            plan = case.plan(be)
            out, plan = case.run(be, plan=plan)
            mask = be.slots[0].layers[0]
            if step % 4 == 0:
                first = mask.kept.clone()
            assert torch.equal(mask.kept, first)  # reused between refreshes
            assert (mask.pages == (case.lens[0] - 1) // PAGE).any(1).all()  # the newest token's page
            want, pairs = attend_pages(case.q, case.kv, case.tables, torch.tensor(case.lens), mask.pages[None],
                                       case.scale)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            assert attended(plan) == pairs.tolist() and attended(plan)[0] < case.lens[0] * HQ
            case.lens[0] += 1  # the next token (its key is whatever the pool holds there)
    finally:
        be.decode_probe = orig
    g = HQ // HKV  # a refresh's query block: the group's heads over the last 4 decode queries
    assert probed == [(900, g), (904, 4 * g), (908, 4 * g)]
    be.free([0])
    assert 0 not in be.slots


def test_decode_refresh_every_step_equals_fresh_plan_and_sees_new_tokens():
    case = make_case([900], seed=3)
    plant_heavy_key(case, 0, 890, head=1)  # inside the window: attended although never searched
    be = backend("hip", **dict(SMALL, refresh_interval=(1,), sliding_window=16))
    be.free([0])
    out, _ = case.run(be)
    lists = be.slots[0].layers[0].kept
    fresh = backend("hip", **dict(SMALL, refresh_interval=(2,), sliding_window=16))
    fresh.free([0])
    out2, _ = case.run(fresh)
    assert torch.equal(out, out2) and torch.equal(lists, fresh.slots[0].layers[0].kept)
    from sparsekv.attention.hip_plan import decode_pages
    pages = decode_pages(be.params, lists, 900, 16, 16)
    assert (pages == 890 // 16).any(1).all() and (pages == 0).any(1).all()


def test_stage_refresh_schedule():
    be = backend("hip", **STAGED)
    be.free([7])
    metas = [type("Meta", (), {})() for _ in range(18)]
    got = [be._advance(7, 900 + i, metas[i]) for i in range(17)]
    assert got == [0, None, None, None, 1, None, None, None, 0, None, None, None, 1, None, None, None, 0]
    assert be._advance(7, 916, metas[16]) == 0 and be.slots[7].step == 17  # a second plan in the step: no advance
    assert be._advance(7, 100, metas[17]) == 0  # a shorter context: another request in the slot, start over


def test_params_are_validated():
    for bad in (dict(mask_k=513), dict(block_stride_q=128), dict(sliding_window=4),
                dict(refresh_interval=(4, 8)), dict(stages=((64, 256), (8, 64))), dict(block_size_k=3),
                dict(representative="last"), dict(unknown=1), dict(mask_k=0),
                dict(STAGED, stages=((60, 240), (8, 64)))):
        with pytest.raises(ValueError):
            HiPParams(**bad)
    HiPParams(**STAGED)
    hash(HiPParams(**STAGED))


def test_presets_validate():
    from sparsekv.config import preset

    for name in ("hip", "infinitehip"):
        cfg = preset(name)
        assert cfg.prefill.params("prefill") == cfg.decode.params("decode")


@pytest.mark.slow
def test_bench_attention_runs_hip_in_both_phases(tmp_path):
    import argparse
    import json

    from sparsekv.bench import attention as bench

    config = tmp_path / "hip.json"
    small = dict(SMALL, block_size_k=16, mask_k=64)
    config.write_text(json.dumps({"prefill": {"method": "hip", **small}, "decode": {"method": "hip", **small}}))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--methods", f"dense,{config}", "--lengths", "512", "--repeats", "2",
                              "--num-layers", "2", "--dtype", "float32", "--output", str(tmp_path / "out")])
    assert bench.run(args) == 0
    rows = {(r["method"], r["phase"]): r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    for phase in ("prefill", "decode"):
        row = rows[(str(config), phase)]
        assert 0 < row["attended_fraction"] < 1 and row["speedup"] > 0
    assert "scoring_ms" in rows[(str(config), "prefill")]


def test_chunk_on_a_block_boundary_selects_like_the_whole_prompt():
    kv, p = _pool(), HiPParams(**SMALL)
    q = torch.randn(700, HQ, D, generator=torch.Generator().manual_seed(5))
    table = torch.arange(44)
    be = get_backend("hip", p)
    whole = run_prefill(be, q, kv, [Seq(0, 700, 700, table)], D ** -0.5)
    tail = run_prefill(be, q[320:], kv, [Seq(0, 380, 700, table)], D ** -0.5)  # 320 = 10 query blocks
    torch.testing.assert_close(tail, whole[320:], rtol=1e-5, atol=1e-5)
