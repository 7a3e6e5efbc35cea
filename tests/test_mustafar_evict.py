"""Eviction over Mustafar's compressed cache: the SnapKV family evicts once at the prompt's end
and the survivors are pruned and compressed (drop tokens first, then compress, as the paper
composes them with H2O/SnapKV). Lossless pruning gives exactly what eviction alone gives, a
budget over the prompt gives Mustafar alone, pages and staging rows go back, and the methods
that evict every step are refused."""
from __future__ import annotations

import pytest

from engine_steps import run_together

from sparsekv import LLM, SamplingParams
from sparsekv.config import SparsityConfig

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the sky is blue and the grass is green and the sun is light " * 8, "remember the pass key 71432 " * 9]
LAYOUT = {"prune": "mustafar", "local_window": 16, "compress_chunk": 32}


def evict(method: str = "snapkv", budget: int = 48) -> dict:
    return {"kv": {"evict": method, "budget": budget}}


def tokens(llm: LLM, sparsity=None, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, sparsity=sparsity, use_tqdm=False)]


def mustafar(tiny_llama, **kv) -> LLM:
    return LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20, max_num_batched_tokens=64,
               sparsity={"kv": {**LAYOUT, **kv}})


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv"])
def test_over_lossless_pruning_equals_eviction_alone(tiny_llama, method):
    """Keeping every element (head_dim 16 at 1%), the rewrite through compressed records and
    staging rows must give eviction's own tokens, with chunked prefill compressing the prompt
    as it goes."""
    plain = LLM(tiny_llama, max_model_len=512, max_num_seqs=4, kv_cache_memory=8 << 20, max_num_batched_tokens=64)
    lossless = mustafar(tiny_llama, sparsity=0.01)
    assert lossless.engine.runner.layout.k_keep == 16
    # Mustafar's decode reads whole rows, so every row keeps the largest budget: on the plain
    # cache the same holds under a decode without per-row lengths (Quest at full budget = dense)
    whole_rows = {**evict(method), "decode": {"method": "quest", "budget": 4096}}
    want = tokens(plain, whole_rows)
    assert want != tokens(plain)  # the budget changes the answer, so the test can tell
    assert tokens(lossless, evict(method)) == want


def test_budget_over_the_prompt_is_mustafar_alone(tiny_llama):
    llm = mustafar(tiny_llama)
    assert tokens(llm, evict(budget=4096)) == tokens(llm)


def test_pages_and_rows_go_back_and_the_other_request_is_unchanged(tiny_llama):
    llm = mustafar(tiny_llama)
    engine, cache = llm.engine, llm.engine.runner.kv_cache
    alone = tokens(llm, prompts=PROMPTS[1:])
    held = []

    def check(engine):
        for seq in engine.scheduler.running:
            kv_len = seq.num_computed_tokens - seq.num_evicted_tokens
            assert len(seq.block_table) <= kv_len // 16 + 1
            if seq.request_id == "a":
                held.append((seq.num_evicted_tokens, kv_len))
        staged = sum(len(v) for v in cache._owned.values())
        assert staged + len(cache._free_rows) == cache.layers[0].k.shape[0]

    got = run_together(engine, {"a": (PROMPTS[0], evict()), "b": (PROMPTS[1], None)}, GREEDY, check)
    assert max(e for e, _ in held) > 0 and all(n <= 48 + GREEDY.max_tokens for e, n in held if e)
    assert got["b"].token_ids == alone[0]
    assert len(cache._free_rows) == cache.layers[0].k.shape[0]
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
def test_every_step_eviction_is_refused(tiny_llama, method):
    with pytest.raises(ValueError, match="evicts at every step"):
        SparsityConfig.model_validate({"kv": {**LAYOUT, "evict": method, "budget": 64}})
    llm = mustafar(tiny_llama)
    with pytest.raises(ValueError, match="evicts at every step"):
        llm.generate(PROMPTS[:1], GREEDY, sparsity=evict(method), use_tqdm=False)
