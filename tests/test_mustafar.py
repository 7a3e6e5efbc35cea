"""Mustafar: the compressed format, the staged/compressed pool, attention over it, the engine."""
from __future__ import annotations

import pytest
import torch
from mustafar_cases import Driver

from sparsekv import LLM, SamplingParams
from sparsekv.attention.mustafar import materialise, request_kv
from sparsekv.attention.paged import decode_attention, prefill_attention
from sparsekv.cache.compressed import MustafarLayout
from sparsekv.cache.kv_cache import KVCache
from sparsekv.cache.kv_prune import compress, decompress, keep_count, pack_bits, prune, token_bytes, unpack_bits
from sparsekv.config import SparsityConfig

LAYOUT = MustafarLayout(k_keep=6, v_keep=8, local_window=8, compress_chunk=16)


@pytest.mark.parametrize("keep", [1, 7, 8, 9, 16])
def test_round_trip_and_exact_count(keep):
    x = torch.randn(3, 5, 40, 16)
    vals, bits = compress(x, keep)
    assert vals.shape == (3, 5, 40, keep) and bits.shape == (3, 5, 40, 2) and bits.dtype == torch.uint8
    mask = unpack_bits(bits)
    assert bool((mask.sum(-1) == keep).all())  # every bitmap holds exactly `keep` channels
    assert torch.equal(vals, x[mask].view(3, 5, 40, keep))  # the values in ascending channel order
    y = decompress(vals, bits, 16)
    assert torch.equal(y, prune(x, keep)) and torch.equal(y != 0, mask)
    assert torch.equal(y[mask], x[mask])  # the kept elements are stored bit-exactly
    # and they are the largest |x| of each vector
    assert bool((x.abs().masked_fill(mask, -1).amax(-1) <= x.abs().masked_fill(~mask, float("inf")).amin(-1)).all())
    assert torch.equal(decompress(*compress(y, keep), 16), y)  # a pruned vector compresses losslessly


@pytest.mark.parametrize("d", [8, 32, 64, 128])
def test_bitmap_bit_order(d):
    """Bit c % 8 of byte c // 8 is channel c, so 8 bytes read as a little-endian uint64 are 64
    channels, as the kernels load them."""
    channels = torch.tensor([0, 3, d - 1] + ([9, 63] if d >= 64 else []))
    mask = torch.zeros(d, dtype=torch.bool)
    mask[channels] = True
    bits = pack_bits(mask)
    assert bits.shape == (d // 8,) and torch.equal(unpack_bits(bits), mask)
    word = int.from_bytes(bits.numpy().tobytes(), "little")
    assert word == sum(1 << int(c) for c in channels.unique())
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(12, dtype=torch.bool))


def test_keep_rules():
    assert keep_count(0.7, 64) == 19 and keep_count(0.5, 64) == 32 and keep_count(0.0, 64) == 64
    assert keep_count(0.7, 128, "mustafar_compat") == 40  # the reference code's 68.75%
    assert keep_count(0.5, 128, "mustafar_compat") == 65
    assert keep_count(0.0, 128, "mustafar_compat") == 128


def test_cache_reads_pruned_prefix_and_dense_window():
    """Every step, each layer reads tokens [0, compressed_len(prev len)) pruned and the rest as
    written; two interleaved requests, prefill in two chunks, then decode."""
    drv = Driver(LAYOUT)
    drv.step({0: drv.stream(21), 1: drv.stream(40)})
    drv.step({0: drv.stream(19)})
    prev = dict(drv.lens)
    for _ in range(30):
        drv.step({0: drv.stream(1), 1: drv.stream(1)}, "decode")
        for slot in (0, 1):
            c = LAYOUT.compressed_len(prev[slot])
            assert drv.lens[slot] - c >= LAYOUT.local_window + 1  # the window stays dense
            for layer in range(2):
                kv = drv.cache.layers[layer]
                got = materialise(request_kv(kv, torch.tensor(drv.tables[slot]), drv.lens[slot], c))
                for g, e in zip(got, drv.expected(slot, layer, c)):
                    assert torch.equal(g, e)
        prev = dict(drv.lens)


def test_appending_equals_compressing_the_concatenation():
    """Chunk by chunk in decode steps, or all at once in one prefill: the same records."""
    a, b = Driver(LAYOUT, seed=3), Driver(LAYOUT, seed=3)
    tokens = a.stream(70)
    b.stream(70)
    a.step({0: [(k[:70], v[:70]) for k, v in tokens]})
    b.step({0: [(k[:5], v[:5]) for k, v in tokens]})
    for t in range(5, 70):
        b.step({0: [(k[t:t + 1], v[t:t + 1]) for k, v in tokens]}, "decode")
    tail = a.stream(1)
    a.step({0: tail}, "decode")
    b.step({0: tail}, "decode")
    c = LAYOUT.compressed_len(70)
    assert c == 48
    for layer in range(2):
        ra = request_kv(a.cache.layers[layer], torch.tensor(a.tables[0]), 71, c)
        rb = request_kv(b.cache.layers[layer], torch.tensor(b.tables[0]), 71, c)
        for name in ("kc", "kb", "vc", "vb", "k", "v"):
            assert torch.equal(getattr(ra, name), getattr(rb, name)), name


def test_release_returns_staging_rows():
    drv = Driver(LAYOUT)
    total = len(drv.cache._free_rows)
    drv.step({0: drv.stream(50), 1: drv.stream(9)})
    drv.step({0: drv.stream(1), 1: drv.stream(1)}, "decode")
    drv.release(0)
    drv.step({1: drv.stream(1)}, "decode")
    drv.release(1)
    assert len(drv.cache._free_rows) == total and bool((drv.cache.rows < 0).all())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (2, 2)])
def test_decode_equals_dense_attention_over_pruned_cache(hq, hkv, compiled, monkeypatch):
    """Both CPU paths: the compiled kernels (where they build) and the PyTorch one."""
    from sparsekv.attention.kernels import cpu_compressed

    if compiled and not cpu_compressed.available():
        pytest.skip("no compiler for the CPU kernel here")
    monkeypatch.setattr(cpu_compressed, "available", lambda: compiled)
    drv = Driver(LAYOUT, hq=hq, hkv=hkv, d=32)  # a head dim the paged-decode kernel is built for
    drv.step({0: drv.stream(45), 1: drv.stream(12), 2: drv.stream(80)})
    prev = dict(drv.lens)
    q = torch.randn(3, hq, 32)
    outs = drv.step({s: drv.stream(1) for s in (0, 1, 2)}, "decode", q=q)
    for layer, out in enumerate(outs):
        for i, slot in enumerate((0, 1, 2)):
            k, v = drv.expected(slot, layer, LAYOUT.compressed_len(prev[slot]))
            torch.testing.assert_close(out[i], decode_attention(q[i], k, v, drv.shape.scale), rtol=1e-5, atol=1e-5)


def test_prefill_equals_token_by_token_decode():
    """Query p reads [0, compressed_len(p)) pruned, in a prefill chunk as in decode: a prompt
    prefilled in two chunks gives each position the output decode would."""
    drv = Driver(LAYOUT)
    tokens = drv.stream(70)
    q = torch.randn(70, 4, 16)
    out = [drv.step({0: [(k[:30], v[:30]) for k, v in tokens]}, q=q[:30]),
           drv.step({0: [(k[30:], v[30:]) for k, v in tokens]}, q=q[30:])]
    for layer in range(2):
        got = torch.cat([out[0][layer], out[1][layer]])
        for p in range(70):
            k, v = drv.expected(0, layer, LAYOUT.compressed_len(p))
            want = decode_attention(q[p], k[:, :p + 1], v[:, :p + 1], drv.shape.scale)
            torch.testing.assert_close(got[p], want, rtol=1e-5, atol=1e-5)
    short = Driver(LAYOUT)  # within window + chunk: plain dense prefill
    q = torch.randn(20, 4, 16)
    got = short.step({0: short.stream(20)}, q=q)[0]
    k, v = short.hist[0][0]
    torch.testing.assert_close(got, prefill_attention(q, k, v, short.shape.scale))


def test_page_bytes_match_the_tensors():
    drv = Driver(LAYOUT, num_pages=10)
    kv = drv.cache.layers[0]
    assert kv.kb.shape == kv.vb.shape == (10, 2, 8, 2)  # [pages, Hkv, ps, D // 8]
    measured = sum(x.nbytes for x in (kv.kc, kv.kb, kv.vc, kv.vb)) // 10 * 2  # two layers
    assert measured == LAYOUT.page_bytes(2, 8, 2, 16, 4) == 2 * 2 * 8 * ((6 + 8) * 4 + 2 * 2)


@pytest.mark.parametrize("keep,elem,d,want", [(19, 4, 64, 84), (32, 4, 64, 136), (19, 2, 64, 46), (38, 4, 128, 168),
                                              (64, 2, 128, 144)])
def test_token_bytes(keep, elem, d, want):
    """keep values + D / 8 bitmap bytes: at 70% and head dim 64 in fp32, 84 of 256 bytes (0.33)."""
    assert token_bytes(keep, elem, d) == want
    x = torch.randn(2, d).to(torch.float32 if elem == 4 else torch.bfloat16)
    assert sum(t[0].nbytes for t in compress(x, keep)) == want


def test_head_dim_must_hold_whole_bitmap_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        Driver(LAYOUT, d=12)


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the sky is blue and the grass is green and the sun is light " * 8, "remember the pass key 71432 " * 9,
           "hello world one two three"]
SMALL = {"kv": {"prune": "mustafar", "local_window": 16, "compress_chunk": 32}}


@pytest.fixture(scope="module")
def dense_llm(tiny_llama):
    return LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20)


def _tokens(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_engine_sparsity_zero_is_dense(tiny_llama, dense_llm):
    zero = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20,
               sparsity={"kv": {"prune": "mustafar", "sparsity": 0.0}})
    assert zero.engine.runner.layout is None
    assert _tokens(zero) == _tokens(dense_llm)


def test_engine_keep_all_matches_dense(tiny_llama, dense_llm):
    """Keeping every element (head_dim 16 at 1%): the compressed path equals dense."""
    llm = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20,
              sparsity={"kv": {**SMALL["kv"], "sparsity": 0.01}})
    assert llm.engine.runner.layout.k_keep == 16
    assert _tokens(llm) == _tokens(dense_llm)


def test_engine_pruned_batch_equals_alone_and_grows_the_pool(tiny_llama, dense_llm):
    llm = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20,
              max_num_batched_tokens=64, sparsity=SMALL)
    runner = llm.engine.runner
    together = _tokens(llm)
    assert [_tokens(llm, [p])[0] for p in PROMPTS] == together
    assert len(runner.kv_cache._free_rows) == runner.kv_cache.layers[0].k.shape[0]  # all rows returned
    assert llm.engine.block_manager.enable_prefix_caching is False


def test_pool_grows_by_the_measured_factor(tiny_llama):
    """At a fixed KV memory the compressed pool holds (memory - staging) / compressed page bytes
    pages, the block manager admits by them, and the factor is the tensors' measured one."""
    args = dict(max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory=1 << 20)
    dense = LLM(tiny_llama, **args).engine
    pruned = LLM(tiny_llama, **args, sparsity=SMALL).engine
    runner, cache = pruned.runner, pruned.runner.kv_cache
    dense_page = dense.runner.kv_cache.layers[0].k[0].nbytes * 2 * len(cache.layers)
    comp_page = sum(x[0].nbytes for kv in cache.layers for x in (kv.kc, kv.kb, kv.vc, kv.vb))
    rows = cache.layers[0].k.shape[0]
    assert rows == runner.layout.staging_rows(4, 64, 16)
    assert dense.runner.num_pages == (1 << 20) // dense_page
    assert runner.num_pages == ((1 << 20) - rows * dense_page) // comp_page
    assert pruned.block_manager.num_free_blocks == runner.num_pages
    assert dense_page / comp_page == pytest.approx(2 * 16 * 4 / (2 * (5 * 4 + 2)))  # 0.7: 5 of 16 + 2 bitmap bytes
    assert runner.num_pages > 1.8 * dense.runner.num_pages


@pytest.mark.parametrize("bad", [
    {"kv": {"prune": "mustafar", "k_sparsity": 1.0}},
    {"kv": {"prune": "mustafar", "v_sparsity": -0.1}},
    {"kv": {"prune": "mustafar", "local_window": -1}},
    {"kv": {"prune": "mustafar", "compress_chunk": 0}},
    {"kv": {"prune": "mustafar", "keep_rule": "threshold"}},
    {"kv": {"prune": "mustafar", "sparsity": 1.0}},
    {"kv": {"prune": "mustafar"}, "decode": {"method": "delta", "budget": 288}},  # no page past the window
    {"kv": {"prune": "mustafar"}, "prefill": {"method": "xattention"}},
    {"kv": {"prune": "mustafar"}, "decode": {"method": "quest", "budget": 288}},  # no page past the window
    {"decode": {"method": "mustafar_quest"}},
    {"decode": {"method": "mustafar"}},
    {"kv": {"prune": "mustafr"}},
])
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SparsityConfig.model_validate(bad)


def test_engine_rejects_bad_layout_and_request_overrides(tiny_llama):
    with pytest.raises(ValueError, match="multiple of the KV page size"):
        LLM(tiny_llama, max_model_len=256, max_num_seqs=2, sparsity={"kv": {"prune": "mustafar", "compress_chunk": 24}})
    llm = LLM(tiny_llama, max_model_len=256, max_num_seqs=2, kv_cache_memory=4 << 20, sparsity=SMALL)
    with pytest.raises(ValueError, match="server setting"):
        llm.generate(["hello"], GREEDY, sparsity={"kv": {"k_sparsity": 0.5}}, use_tqdm=False)
