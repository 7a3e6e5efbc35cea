"""Quest over Mustafar's compressed cache (attention/mustafar_quest.py): the compressed kernel's
page lists against the PyTorch path, bounds of the pruned keys, the budget (window always read),
a planted needle page kept, a full budget equal to Mustafar alone, and the engine end to end."""
from __future__ import annotations

import pytest
import torch
from mustafar_cases import Driver
from test_mustafar import GREEDY, PROMPTS, SMALL

from sparsekv import LLM
from sparsekv.attention.backend import BackendParams
from sparsekv.attention.kernels import cpu_compressed
from sparsekv.attention.quest import QuestParams
from sparsekv.cache.compressed import MustafarLayout
from sparsekv.cache.kv_cache import PAGE_BOUNDS
from sparsekv.cache.kv_prune import decompress

LAYOUT = MustafarLayout(k_keep=6, v_keep=5, local_window=8, compress_chunk=16)
PARAMS = QuestParams(page_size=8, budget=48)  # 8 + 16 window tokens, then 3 compressed pages of 8


def _driver(hq: int = 4, hkv: int = 2) -> Driver:
    drv = Driver(LAYOUT, hq=hq, hkv=hkv, d=32, num_pages=128, num_rows=64)
    drv.cache.ensure(PAGE_BOUNDS)
    return drv


@pytest.mark.parametrize("compiled", [True, False])
def test_selection_reads_only_listed_pages_and_the_window(compiled, monkeypatch):
    """Output = attention over (the chosen compressed pages, per KV head) + the dense window,
    the chosen pages being the top bound scores; attended pairs count exactly those tokens."""
    if compiled and not cpu_compressed.available():
        pytest.skip("no compiler for the CPU kernel here")
    monkeypatch.setattr(cpu_compressed, "available", lambda: compiled)
    drv = _driver()
    drv.step({0: drv.stream(150), 1: drv.stream(20), 2: drv.stream(90)})
    prev = dict(drv.lens)
    q = torch.randn(3, 4, 32)
    outs = drv.step({s: drv.stream(1) for s in (0, 1, 2)}, "decode", q=q, backend="mustafar_quest", params=PARAMS)
    scale, hkv, g = drv.shape.scale, 2, 2
    for layer, out in enumerate(outs):
        kv = drv.cache.layers[layer]
        for i, slot in enumerate((0, 1, 2)):
            nc = LAYOUT.compressed_len(prev[slot])
            k, v = drv.expected(slot, layer, nc)
            pages = nc // 8
            want = torch.empty(4, 32)
            for h in range(hkv):
                kh = k[h, :nc].view(pages, 8, 32)
                bound = torch.stack([(q[i, h * g + j].clamp(min=0) * kh.amax(1) + q[i, h * g + j].clamp(max=0)
                                      * kh.amin(1)).sum(-1) for j in range(g)]).amax(0)
                keep = bound.topk(3).indices.sort().values if pages > 3 else torch.arange(pages)
                tok = torch.cat([(keep.view(-1, 1) * 8 + torch.arange(8)).flatten(), torch.arange(nc, k.shape[1])])
                s = q[i, h * g:(h + 1) * g] @ k[h, tok].T * scale
                want[h * g:(h + 1) * g] = torch.softmax(s, -1) @ v[h, tok]
            torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
    nc = [LAYOUT.compressed_len(prev[s]) for s in (0, 1, 2)]
    read = [min(n, 3 * 8) + (prev[s] + 1 - n) for n, s in zip(nc, (0, 1, 2))]
    assert drv.last_plan.attended.tolist() == [2 * 4 * r for r in read]  # two layers, four query heads


def test_bounds_are_those_of_the_pruned_keys_also_when_made_late():
    """Bounds filled at compression equal a table made from the records after the fact."""
    early = _driver()
    late = Driver(LAYOUT, hq=4, hkv=2, d=32, num_pages=128, num_rows=64)
    for drv in (early, late):
        drv.gen.manual_seed(3)
        drv.step({0: drv.stream(100)})
    late.cache.ensure(PAGE_BOUNDS)
    table = torch.tensor(early.tables[0][:LAYOUT.compressed_len(100) // 8])
    for a, b in zip(early.cache.layers, late.cache.layers):
        keys = decompress(a.kc[table], a.kb[table], 32)
        torch.testing.assert_close(a.kmin[table], keys.amin(2))
        torch.testing.assert_close(a.kmax[table], keys.amax(2))
        torch.testing.assert_close(b.kmin[table], a.kmin[table])
        torch.testing.assert_close(b.kmax[table], a.kmax[table])


def test_needle_page_is_kept():
    """A key aligned with the query in an old compressed page is read; the budget holds."""
    drv = _driver(hq=2, hkv=1)
    stream = drv.stream(200)
    q = torch.randn(1, 1, 32).expand(1, 2, 32).contiguous()  # both heads of the group look for it
    for k, _ in stream:
        k[37, 0] = q[0, 0] * 5  # token 37: page 4, long compressed
    drv.step({0: stream})
    outs = drv.step({0: drv.stream(1)}, "decode", q=q, backend="mustafar_quest", params=PARAMS)
    nc = LAYOUT.compressed_len(200)
    for layer, out in enumerate(outs):
        k, v = drv.expected(0, layer, nc)
        p = torch.softmax(q[0] @ k[0].T * drv.shape.scale, -1)
        assert p[:, 37].min() > 0.5  # the needle dominates dense attention, so keeping it shows
        torch.testing.assert_close(out[0], p @ v[0], rtol=0.25, atol=0.1)
    assert drv.last_plan.attended.item() < 2 * 2 * 201 * 0.5


def test_full_budget_equals_mustafar_alone():
    outs = []
    for backend, params in (("mustafar_quest", QuestParams(page_size=8, budget=4096)), ("mustafar", BackendParams())):
        drv = _driver()
        drv.step({0: drv.stream(120), 1: drv.stream(33)})
        q = torch.randn(2, 4, 32, generator=drv.gen)
        outs.append(drv.step({s: drv.stream(1) for s in (0, 1)}, "decode", q=q, backend=backend, params=params))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def mustafar_llm(tiny_llama):
    return LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20, sparsity=SMALL)


def _generate(llm, sparsity=None):
    outs = llm.generate(PROMPTS, GREEDY, sparsity=sparsity, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.sparsity for o in outs]


def test_engine_quest_over_mustafar(tiny_llama, mustafar_llm):
    """Per request on a Mustafar server: a budget past the context is Mustafar's output token
    for token; a small one reads less (decode attended fraction below 1) and still generates."""
    base, _ = _generate(mustafar_llm)
    full, _ = _generate(mustafar_llm, {"decode": {"method": "quest", "budget": 4096}})
    assert full == base
    small, stats = _generate(mustafar_llm, {"decode": {"method": "quest", "budget": 80, "page_size": 16},
                                               "dense_layers": []})
    assert all(len(t) == GREEDY.max_tokens for t in small)
    assert stats[0].decode_attended_fraction < 0.9  # the long prompts were selected over
    server = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20,
                 sparsity={**SMALL, "decode": {"method": "quest", "budget": 80, "page_size": 16}, "dense_layers": []})
    assert _generate(server)[0] == small  # the server's config and a request's give the same
