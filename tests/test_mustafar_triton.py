"""The Mustafar Triton decode (bitmap decompression in registers, split-K, merged with the
paged-decode kernel's dense window) against the PyTorch path, under the interpreter at small
fp32 shapes.
The interpreter must be chosen before triton is imported."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mustafar_cases import Driver  # noqa: E402

from sparsekv.cache.compressed import MustafarLayout  # noqa: E402


@pytest.mark.parametrize("d,hq,hkv,k_keep,v_keep", [(16, 4, 2, 6, 8), (16, 4, 1, 16, 3), (16, 2, 2, 1, 5),
                                                    (32, 4, 2, 10, 32)])
def test_triton_decode_matches_pytorch(d, hq, hkv, k_keep, v_keep, monkeypatch):
    from sparsekv.attention.kernels import cpu_compressed

    monkeypatch.setattr(cpu_compressed, "available", lambda: False)  # the CPU side: the PyTorch path
    layout = MustafarLayout(k_keep, v_keep, local_window=8, compress_chunk=16)
    outs = []
    for device in ("cpu", "cuda"):  # two identical caches (same seed), one per path
        drv = Driver(layout, hq=hq, hkv=hkv, d=d, layers=1)
        drv.step({0: drv.stream(75), 1: drv.stream(9), 2: drv.stream(140)})
        q = torch.randn(3, hq, d, generator=torch.Generator().manual_seed(1))
        outs.append(drv.step({s: drv.stream(1) for s in (0, 1, 2)}, "decode", q=q, device=device)[0])
    assert drv.layout.compressed_len(140) == 128  # several splits of compressed tokens, one request with none
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["mustafar_quest", "mustafar_delta"])
def test_triton_page_lists_match_pytorch(backend, monkeypatch):
    """Quest / DELTA over the compressed cache: the listed pages (per KV head for Quest) through
    the Triton kernel equal the PyTorch path's (one request past the budget, one within it, one
    with no compressed pages)."""
    from sparsekv.attention.delta import DeltaParams
    from sparsekv.attention.kernels import cpu_compressed
    from sparsekv.attention.quest import QuestParams
    from sparsekv.cache.kv_cache import PAGE_BOUNDS

    monkeypatch.setattr(cpu_compressed, "available", lambda: False)
    layout = MustafarLayout(6, 5, local_window=8, compress_chunk=16)
    params = (QuestParams(page_size=8, budget=48) if backend == "mustafar_quest"  # 3 compressed pages of 8
              else DeltaParams(delta_layers=(0,), page_size=8, budget=48, recent_pages=2))
    outs, attended = [], []
    for device in ("cpu", "cuda"):
        drv = Driver(layout, hq=4, hkv=2, d=32, layers=2, num_pages=128, num_rows=64)
        drv.cache.ensure(PAGE_BOUNDS)
        drv.step({0: drv.stream(150), 1: drv.stream(30), 2: drv.stream(9)})
        q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
        outs.append(torch.stack(drv.step({s: drv.stream(1) for s in (0, 1, 2)}, "decode", q=q, device=device,
                                         backend=backend, params=params)))
        attended.append(drv.last_plan.attended.tolist())
    assert layout.compressed_len(150) // 8 > 3  # request 0 reads a selection, not every page
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert attended[0] == attended[1]
