"""HiP's compiled CPU search (csrc/hip_search.cpp) against the PyTorch reference: the probe's
scores, and the fused tree's selections, on random, tie-heavy and structured inputs."""
import pytest
import torch

from sparsekv.attention.hip_plan import HiPParams, prefill_lists
from sparsekv.attention.hip_search import TreeProbe, cpu_probe, torch_probe, tree_rounds, tree_search
from sparsekv.attention.kernels import cpu_hip
from sparsekv.attention.xattention_select import BlockGeometry
from sparsekv.bench.synthetic import synthetic_qkv

pytestmark = pytest.mark.skipif(not cpu_hip.available(), reason="the CPU kernels do not build here")


def _inputs(kind: str, units: int, m: int, d: int, heads: int, length: int, seed: int = 0):
    """qs [U, M, D], k [H, L, D] of `kind`: gaussian; exact (a 1/8 grid, so every q.k is exact in
    fp32 whatever the summation order: both paths must agree bit for bit); ties (values in
    {-1, 0, 1}: many equal scores, the tie rule decides)."""
    g = torch.Generator().manual_seed(seed)
    qs, k = torch.randn(units, m, d, generator=g), torch.randn(heads, length, d, generator=g)
    if kind == "exact":
        qs, k = (x.mul(8).round().clamp(-24, 24) / 8 for x in (qs, k))
    elif kind == "ties":
        qs, k = (x.round().clamp(-1, 1) for x in (qs, k))
    return qs, k, torch.randint(0, heads, (units,), generator=g)


@pytest.mark.parametrize("m", [8, 32, 40, 128])
@pytest.mark.parametrize("width", [1, 2, 16])
def test_probe_matches_torch(m, width):
    for kind in ("gaussian", "exact"):
        qs, k, ukv = _inputs(kind, 9, m, 64, 3, 600)
        starts = torch.randint(-1, 600 - width, (9, 37))
        got, want = cpu_probe(qs, k, ukv)(starts, width), torch_probe(qs, k, ukv)(starts, width)
        assert got.isneginf().equal(starts < 0)
        if kind == "exact":
            assert torch.equal(got, want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_probe_reads_strided_keys_in_place():
    qs, k, ukv = _inputs("exact", 4, 16, 32, 2, 256)
    rows = k.transpose(0, 1).contiguous().transpose(0, 1)  # [H, L, D] with a row stride of H * D
    starts = torch.randint(0, 254, (4, 10))
    assert torch.equal(cpu_probe(qs, rows, ukv)(starts, 2), torch_probe(qs, k, ukv)(starts, 2))


@pytest.mark.parametrize("kind", ["gaussian", "exact", "ties"])
@pytest.mark.parametrize("rep", ["center", "first"])
@pytest.mark.parametrize("keep,block", [(16, 2), (8, 4), (1, 1), (32, 2)])
def test_tree_matches_torch(kind, rep, keep, block):
    qs, k, ukv = _inputs(kind, 24, 32, 64, 3, 2048, seed=keep + block)
    g = torch.Generator().manual_seed(7)
    lo = torch.randint(0, 8, (24,), generator=g)
    hi = lo + torch.randint(0, 2048 // block - 8, (24,), generator=g)
    hi[:3] = lo[:3] + torch.tensor([0, 1, keep])  # no middle blocks, one, exactly the budget
    fused = cpu_probe(qs, k, ukv)
    assert isinstance(fused, TreeProbe) and not isinstance(torch_probe(qs, k, ukv), TreeProbe)
    got, rounds = tree_search(fused, lo, hi, keep, block, rep)
    want, _ = tree_search(torch_probe(qs, k, ukv), lo, hi, keep, block, rep)
    assert rounds == tree_rounds(int((hi - lo).max()), keep) > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("gqa_mode", ["per_q_head", "group_max"])
def test_prefill_lists_match_on_structured_inputs(gqa_mode):
    """Llama-3-8B-shaped synthetic heads (bands, sink, heavy keys) on the exact grid, the
    default block sizes at a small budget, a chunk that starts mid-block."""
    p = HiPParams(mask_k=64, block_size_q=32, sliding_window=64, sink=8, gqa_mode=gqa_mode)
    q, k, _ = synthetic_qkv(1024, 3, torch.float32, "cpu")
    q, k = (x.mul(8).round() / 8 for x in (q, k))
    for q_len in (1024, 500):
        geom = BlockGeometry(p.block_size_q, q_len, 1024)
        kp = torch.nn.functional.pad(k, (0, 0, 0, geom.num_kblocks * p.block_size_q - 1024))
        got = prefill_lists(p, q[-q_len:], geom, k.shape[0], lambda qs, u: cpu_probe(qs, kp, u))
        want = prefill_lists(p, q[-q_len:], geom, k.shape[0], lambda qs, u: torch_probe(qs, kp, u))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
