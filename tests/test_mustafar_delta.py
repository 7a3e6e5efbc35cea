"""DELTA over Mustafar's compressed cache (attention/mustafar_delta.py): a Δ-layer reads every
compressed token and picks, by DELTA's page mass over the pruned keys, the compressed pages the
next layers read beside the dense window; a full budget equals Mustafar alone; the engine runs
it per request and from the server's config alike."""
from __future__ import annotations

import pytest
import torch
from mustafar_cases import Driver
from test_mustafar import GREEDY, PROMPTS, SMALL
from test_mustafar_quest import LAYOUT, _generate, mustafar_llm  # noqa: F401 - the fixture

from sparsekv import LLM
from sparsekv.attention.backend import BackendParams
from sparsekv.attention.delta import DeltaParams
from sparsekv.attention.kernels import cpu_compressed

PARAMS = DeltaParams(delta_layers=(0,), budget=48, page_size=8, recent_pages=2)  # 3 compressed pages kept


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tok: torch.Tensor, scale: float) -> torch.Tensor:
    g = q.shape[0] // k.shape[0]
    return torch.cat([torch.softmax(q[h * g:(h + 1) * g] @ k[h, tok].T * scale, -1) @ v[h, tok]
                      for h in range(k.shape[0])])


@pytest.mark.parametrize("compiled", [True, False])
def test_later_layers_read_the_delta_layers_pages(compiled, monkeypatch):
    if compiled and not cpu_compressed.available():
        pytest.skip("no compiler for the CPU kernel here")
    monkeypatch.setattr(cpu_compressed, "available", lambda: compiled)
    drv = Driver(LAYOUT, hq=4, hkv=2, d=32, layers=3, num_pages=160, num_rows=64)
    drv.step({0: drv.stream(150), 1: drv.stream(20), 2: drv.stream(90)})
    prev = dict(drv.lens)
    q = torch.randn(3, 4, 32)
    outs = drv.step({s: drv.stream(1) for s in (0, 1, 2)}, "decode", q=q, backend="mustafar_delta", params=PARAMS)
    scale = drv.shape.scale
    for i, slot in enumerate((0, 1, 2)):
        nc = LAYOUT.compressed_len(prev[slot])
        k0, v0 = drv.expected(slot, 0, nc)
        every = torch.arange(k0.shape[1])
        torch.testing.assert_close(outs[0][i], _attend(q[i], k0, v0, every, scale), rtol=1e-5, atol=1e-5)
        probs = torch.softmax(q[i].view(2, 2, 32) @ k0.transpose(1, 2) * scale, -1)[..., :nc]
        mass = probs.flatten(0, 1).amax(0).view(-1, 8).sum(-1)
        keep = mass.topk(3).indices.sort().values if nc // 8 > 3 else torch.arange(nc // 8)
        tok = torch.cat([(keep.view(-1, 1) * 8 + torch.arange(8)).flatten(), torch.arange(nc, k0.shape[1])])
        for layer in (1, 2):
            k, v = drv.expected(slot, layer, nc)
            torch.testing.assert_close(outs[layer][i], _attend(q[i], k, v, tok, scale), rtol=1e-5, atol=1e-5)
    assert LAYOUT.compressed_len(prev[0]) // 8 > 3 and LAYOUT.compressed_len(prev[1]) // 8 <= 3
    full = [prev[s] + 1 for s in (0, 1, 2)]
    read = [min(LAYOUT.compressed_len(prev[s]), 3 * 8) + prev[s] + 1 - LAYOUT.compressed_len(prev[s])
            for s in (0, 1, 2)]
    assert drv.last_plan.attended.tolist() == [4 * (f + 2 * r) for f, r in zip(full, read)]  # Δ-layer + two


def test_full_budget_equals_mustafar_alone():
    outs = []
    for backend, params in (("mustafar_delta", DeltaParams(delta_layers=(0,), budget=4096, page_size=8)),
                            ("mustafar", BackendParams())):
        drv = Driver(LAYOUT, hq=4, hkv=2, d=32, layers=3, num_pages=128, num_rows=64)
        drv.step({0: drv.stream(120), 1: drv.stream(33)})
        q = torch.randn(2, 4, 32, generator=drv.gen)
        outs.append(drv.step({s: drv.stream(1) for s in (0, 1)}, "decode", q=q, backend=backend, params=params))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_engine_delta_over_mustafar(tiny_llama, mustafar_llm):  # noqa: F811
    """A budget past the context is Mustafar's output token for token; a small one reads less
    and still generates; the server's config and a request's give the same."""
    base, _ = _generate(mustafar_llm)
    assert _generate(mustafar_llm, {"decode": {"method": "delta", "budget": 4096}})[0] == base
    small_cfg = {"decode": {"method": "delta", "budget": 80, "page_size": 16, "recent_pages": 2, "delta_layers": [0]},
                 "dense_layers": []}
    small, stats = _generate(mustafar_llm, small_cfg)
    assert all(len(t) == GREEDY.max_tokens for t in small)
    assert stats[0].decode_attended_fraction < 0.9
    server = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20, sparsity={**SMALL, **small_cfg})
    assert _generate(server)[0] == small
