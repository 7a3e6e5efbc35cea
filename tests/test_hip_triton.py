"""HiP's Triton route under the interpreter (float32, small shapes) against the PyTorch path:
the probe kernel, the whole prefill pipeline (probe -> search -> block-sparse paged kernel with
small key blocks) and cached decode over page lists."""
from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from decode_cases import attended, make_case  # noqa: E402
from prefill_cases import Seq, run_prefill  # noqa: E402

from sparsekv.attention.hip import HiPBackend, HiPTriton  # noqa: E402
from sparsekv.attention.hip_plan import HiPParams  # noqa: E402
from sparsekv.attention.hip_search import torch_probe  # noqa: E402
from sparsekv.attention.paged import gather_kv  # noqa: E402
from sparsekv.cache.kv_cache import LayerKV  # noqa: E402


def _interpreted(*names):
    """The kernel modules, re-imported so that their kernels run under the interpreter even when
    an earlier test imported them without it."""
    return [importlib.reload(importlib.import_module(n)) for n in names]


probe_mod, _, _ = _interpreted("sparsekv.attention.kernels.hip_probe", "sparsekv.attention.kernels.prefill",
                               "sparsekv.attention.kernels.decode")
HQ, HKV, D, PAGE = 4, 2, 16, 8
SMALL = dict(mask_k=32, block_size_q=16, block_size_k=4, sliding_window=32, sink=4)


def _pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = LayerKV(torch.randn(48, HKV, PAGE, D, generator=g), torch.randn(48, HKV, PAGE, D, generator=g))
    return kv, torch.randperm(48, generator=g)


@pytest.mark.parametrize("width,m", [(1, 3), (4, 8), (2, 20), (128, 5)])
def test_probe_kernel_matches_torch(width, m):
    kv, perm = _pool()
    table = perm[:40]
    k, _ = gather_kv(kv, table, 320)
    g = torch.Generator().manual_seed(2)
    qs = torch.randn(5, m, D, generator=g)
    ukv = torch.tensor([0, 1, 1, 0, 1])
    starts = torch.randint(0, 320 - width, (5, 37), generator=g)
    starts[0, :5] = -1
    got = probe_mod.paged_probe(qs, kv, table.to(torch.int32), ukv)(starts, width)
    torch.testing.assert_close(got, torch_probe(qs, k, ukv)(starts, width), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", [
    SMALL, pytest.param(dict(SMALL, gqa_mode="group_max"), marks=pytest.mark.slow),
    pytest.param(dict(SMALL, block_size_k=8, stages=((32, 64), (8, 32)), refresh_interval=(8, 4)),
                 marks=pytest.mark.slow)])
def test_prefill_pipeline_matches_cpu_path(params):
    kv, perm = _pool(1)
    g = torch.Generator().manual_seed(3)
    # the second is chunked (Lq < Lk), the third short enough to be dense beside the sparse ones
    seqs = [Seq(0, 120, 120, perm[:15]), Seq(120, 40, 100, perm[15:28]), Seq(160, 30, 30, perm[28:32])]
    q = torch.randn(190, HQ, D, generator=g)
    p = HiPParams(**params)
    want = run_prefill(HiPBackend(p), q, kv, seqs, D ** -0.5)
    pairs = [s.attended for s in seqs]
    got = run_prefill(HiPTriton(p), q, kv, seqs, D ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [s.attended for s in seqs] == pairs and pairs[0] < seqs[0].causal_pairs * HQ
    assert pairs[2] == seqs[2].causal_pairs * HQ


def test_decode_matches_cpu_path_across_refreshes():
    params = HiPParams(**dict(SMALL, mask_k=32, sliding_window=16, refresh_interval=(2,)))
    case = make_case([200, 120], page_size=16, seed=4)
    cpu, gpu = HiPBackend(params), HiPTriton(params)
    for _ in range(2):  # a refresh, then a step on the cached mask
        want, plan_cpu = case.run(cpu)
        got, plan_gpu = case.run(gpu)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert attended(plan_gpu) == attended(plan_cpu) and attended(plan_cpu)[0] < case.lens[0] * HQ
        assert all(torch.equal(cpu.slots[s].layers[0].kept, gpu.slots[s].layers[0].kept) for s in (0, 1))
        case.lens = [n + 1 for n in case.lens]
