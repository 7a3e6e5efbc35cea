"""XAttention (PyTorch path): scoring identities, selection rules, and block-sparse attention
against dense attention under the equivalent token mask."""
import json
import math

import pytest
import torch

from prefill_cases import Seq, run_prefill

from sparsekv.attention.backend import get_backend
from sparsekv.attention.dense import DenseBackend
from sparsekv.attention.paged import gather_kv
from sparsekv.attention.xattention import XAttentionBackend, XAttentionParams
from sparsekv.cache.kv_cache import LayerKV
from sparsekv.attention.xattention_select import BlockGeometry, block_scores, select_blocks, strided_keys

HQ, HKV, D, PAGE = 4, 2, 16, 16


def _pool(num_pages=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LayerKV(torch.randn(num_pages, HKV, PAGE, D, generator=g).to(dtype),
                   torch.randn(num_pages, HKV, PAGE, D, generator=g).to(dtype))


def _pages(n, seed=0):
    return torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:n]


def _grid(q, k, geom):
    """Queries [Lq, Hq, D] and keys [Hkv, Lk, D] laid out on the absolute block grid."""
    bs = geom.block_size
    qp = torch.zeros(q.shape[1], geom.num_qblocks * bs, D)
    qp[:, geom.pad_front:geom.pad_front + geom.q_len] = q.transpose(0, 1)
    kp = torch.zeros(k.shape[0], geom.num_kblocks * bs, D)
    kp[:, :k.shape[1]] = k
    return qp, kp


def _scores(q, kv, seq, bs=32, stride=4):
    k, _ = gather_kv(kv, seq.block_table, seq.context_len)
    geom = BlockGeometry(bs, seq.q_len, seq.context_len)
    return block_scores(*_grid(q, k, geom), geom, stride, 1.0), geom


def _run(backend, q, kv, seqs, layer=0, num_layers=1):
    return run_prefill(backend, q, kv, seqs, 1 / math.sqrt(D), layer, num_layers)


@pytest.mark.parametrize("antidiagonal", [True, False])
def test_strided_logits_are_tile_antidiagonal_sums(antidiagonal):
    s, n = 4, 32
    q, k = torch.randn(HKV, n, D), torch.randn(HKV, n, D)
    got = q.reshape(HKV, n // s, s * D) @ strided_keys(k, s, antidiagonal).transpose(1, 2)
    full = (q @ k.transpose(1, 2)).view(HKV, n // s, s, n // s, s)
    t = torch.arange(s)
    want = full[:, :, s - 1 - t, :, t] if antidiagonal else full[:, :, t, :, t]
    torch.testing.assert_close(got, want.sum(0), rtol=1e-4, atol=1e-4)


def test_block_score_rows_sum_to_rows_per_block():
    kv, q = _pool(), torch.randn(70, HQ, D)
    seq = Seq(0, 70, 150, _pages(10))  # chunked: queries 80..149, partial first and last block
    scores, geom = _scores(q, kv, seq)
    rows = scores.sum(-1)
    assert geom.first_block == 2 and geom.pad_front == 16
    torch.testing.assert_close(rows[:, 1:-1], torch.full_like(rows[:, 1:-1], 32 / 4))
    torch.testing.assert_close(rows[:, 0], torch.full_like(rows[:, 0], 4.0))  # 16 real queries
    torch.testing.assert_close(rows[:, -1], torch.full_like(rows[:, -1], 6.0))  # 22 real queries
    assert bool((scores.tril(geom.first_block) == scores).all())  # nothing right of the diagonal


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.9, 0.99])
@pytest.mark.parametrize("q_len,ctx", [(200, 200), (70, 150), (1, 97)])
def test_selection_forced_blocks_causality_and_minimality(tau, q_len, ctx):
    kv, q = _pool(), 3 * torch.randn(q_len, HQ, D)
    scores, geom = _scores(q, kv, Seq(0, q_len, ctx, _pages(13)))
    sel = select_blocks(scores, torch.full((HQ,), tau), geom.first_block)
    qb = geom.first_block + torch.arange(geom.num_qblocks).view(-1, 1)
    kb = torch.arange(geom.num_kblocks).view(1, -1)
    assert bool(sel[:, :, 0].all()) and bool(sel[(kb == qb).expand_as(sel)].all())
    assert not bool(sel[(kb > qb).expand_as(sel)].any())
    forced = ((kb == 0) | (kb == qb)).expand_as(sel)
    total = scores.sum(-1)
    for h in range(HQ):
        for i in range(geom.num_qblocks):
            mass = scores[h, i][sel[h, i]].sum()
            assert mass >= tau * total[h, i] - 1e-6
            extra = sel[h, i] & ~forced[h, i]
            if extra.any():  # dropping the weakest optional block falls below the threshold
                assert mass - scores[h, i][extra].min() < tau * total[h, i]


def test_density_is_monotone_in_threshold():
    kv, q = _pool(), 3 * torch.randn(256, HQ, D)
    scores, geom = _scores(q, kv, Seq(0, 256, 256, _pages(16)))
    counts = [int(select_blocks(scores, torch.full((HQ,), t), 0).sum()) for t in (0, .2, .5, .8, .9, .95, 1)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def _masked_reference(q, kv, seq, sel, bs):
    """Dense attention restricted to the selected blocks (and causal), plus the attended count."""
    k, v = (x.repeat_interleave(HQ // HKV, 0) for x in gather_kv(kv, seq.block_table, seq.context_len))
    pos = torch.arange(seq.context_len - seq.q_len, seq.context_len)
    keys = torch.arange(seq.context_len)
    allowed = sel[:, pos // bs - (seq.context_len - seq.q_len) // bs][:, :, keys // bs]
    allowed = allowed & (keys.view(1, -1) <= pos.view(-1, 1))
    logits = (q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(0, 1), int(allowed.sum())


@pytest.mark.parametrize("gqa_mode", ["per_q_head", "group_max"])
@pytest.mark.parametrize("tau", [0.0, 0.6, 0.9])
def test_block_sparse_equals_masked_dense(gqa_mode, tau):
    """Varlen batch of two, GQA, one sequence chunked (Lq < Lk)."""
    kv = _pool()
    q = 3 * torch.randn(300, HQ, D)
    seqs = [Seq(0, 200, 200, _pages(13, 1)), Seq(200, 100, 230, _pages(15, 2))]
    params = XAttentionParams(block_size=32, stride=4, threshold=tau, gqa_mode=gqa_mode)
    out = _run(XAttentionBackend(params), q, kv, seqs)
    for s in seqs:
        qs = q[s.q_start:s.q_start + s.q_len]
        scores, geom = _scores(qs, kv, s)
        sel = select_blocks(scores, torch.full((HQ,), tau), geom.first_block)
        if gqa_mode == "group_max":
            sel = sel.view(HKV, -1, *sel.shape[1:]).any(1, keepdim=True).expand(-1, HQ // HKV, -1, -1)
            sel = sel.reshape(HQ, geom.num_qblocks, geom.num_kblocks)
        want, pairs = _masked_reference(qs, kv, s, sel, 32)
        torch.testing.assert_close(out[s.q_start:s.q_start + s.q_len], want, atol=1e-5, rtol=1e-5)
        assert s.attended == pairs <= s.causal_pairs * HQ
        assert tau > 0 or pairs < s.causal_pairs * HQ


@pytest.mark.parametrize("threshold", [1.0, ((1.0,) * HQ,)])
def test_threshold_one_is_dense(threshold):
    kv = _pool()
    q = torch.randn(230, HQ, D)
    seqs = [Seq(0, 200, 200, _pages(13, 1)), Seq(200, 30, 230, _pages(15, 2))]
    out = _run(XAttentionBackend(XAttentionParams(block_size=32, stride=4, threshold=threshold)), q, kv, seqs)
    attended = [s.attended for s in seqs]
    want = _run(DenseBackend(XAttentionParams()), q, kv, seqs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert attended == [s.causal_pairs * HQ for s in seqs]


def test_chunked_prefill_selects_like_unchunked():
    """Two chunks at a block boundary give the same rows (same blocks) as one prefill."""
    kv, pages = _pool(), _pages(16)
    q = 3 * torch.randn(256, HQ, D)
    backend = get_backend("xattention", XAttentionParams(block_size=32, stride=8, threshold=0.8))
    whole = Seq(0, 256, 256, pages)
    full = _run(backend, q, kv, [whole])
    first, second = Seq(0, 96, 96, pages), Seq(0, 160, 256, pages)
    out1 = _run(backend, q[:96].clone(), kv, [first])
    out2 = _run(backend, q[96:].clone(), kv, [second])
    torch.testing.assert_close(torch.cat([out1, out2]), full, atol=1e-5, rtol=1e-5)
    assert first.attended + second.attended == whole.attended < whole.causal_pairs * HQ


def test_bf16_path_close_to_fp32():
    kv32, kv16 = _pool(), _pool(dtype=torch.bfloat16)
    q = torch.randn(256, HQ, D)
    backend = XAttentionBackend(XAttentionParams(block_size=32, stride=4, threshold=0.95))
    out32 = _run(backend, q, kv32, [Seq(0, 256, 256, _pages(16))])
    out16 = _run(backend, q.bfloat16(), kv16, [Seq(0, 256, 256, _pages(16))])
    assert (out16.float() - out32).abs().mean() < 2e-2


def test_per_head_threshold_table_from_json(tmp_path):
    table = [[0.0] * HQ, [1.0, 0.0, 0.5, 0.9]]
    path = tmp_path / "tau.json"
    path.write_text(json.dumps(table))
    kv, q = _pool(), 3 * torch.randn(256, HQ, D)
    seq = Seq(0, 256, 256, _pages(16))
    backend = XAttentionBackend(XAttentionParams(block_size=32, stride=4, threshold=str(path)))
    _run(backend, q, kv, [seq], layer=1, num_layers=2)
    scores, geom = _scores(q, kv, seq)
    sel = select_blocks(scores, torch.tensor(table[1]), 0)
    assert seq.attended == _masked_reference(q, kv, seq, sel, 32)[1]
    with pytest.raises(ValueError):
        _run(backend, q, kv, [seq], layer=2, num_layers=3)


def test_params_are_validated():
    with pytest.raises(ValueError):
        XAttentionParams(block_size=16, stride=32)
    with pytest.raises(ValueError):
        XAttentionParams(threshold=-0.1)
    with pytest.raises(ValueError, match="fraction of attention mass"):
        XAttentionParams(threshold=7)
    with pytest.raises(ValueError):
        XAttentionParams(norm=0)
    with pytest.raises(ValueError):
        XAttentionParams(unknown=1)
    hash(XAttentionParams(threshold=[[0.9, 0.8]]))  # tables become tuples: usable as a cache key


@pytest.mark.parametrize("methods,phase", [("dense,xattention", "auto"), ("dense", "decode")])
def test_bench_attention_smoke(tmp_path, methods, phase):
    from sparsekv.bench import attention as bench

    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--methods", methods, "--lengths", "512", "--repeats", "1", "--phase", phase,
                              "--num-layers", "2", "--dtype", "float32", "--output", str(tmp_path)])
    assert bench.run(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["phase"]): r for r in result["rows"]}
    assert (tmp_path / "attention.png").exists()
    if phase == "decode":
        assert rows[("dense", "decode")]["bandwidth_limit_ms"] > 0
    else:
        x = rows[("xattention", "prefill")]
        assert 0 < x["attended_fraction"] < 1 and x["speedup"] > 0 and "scoring_ms" in x
