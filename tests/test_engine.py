"""Scheduling, paging and sampling behaviour of the engine on a real tiny checkpoint."""
from __future__ import annotations

import pytest

from sparsekv import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [
    "the cat",
    "hello world one two three four five six seven eight nine zero red blue green",
    "the sky is blue and the grass is green and the sun is light and the moon is dark " * 3,
    "remember the pass key 71432 and the magic number 555",
]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=512, max_num_seqs=1)
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def run(model: str, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, **{"max_model_len": 512, **engine_args})
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def assert_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == len(bm.blocks)
    assert not llm.engine.has_unfinished_requests()


def test_batched_equals_one_by_one(tiny_llama, reference):
    tokens, llm = run(tiny_llama, max_num_seqs=8)
    assert tokens == reference
    assert_pool_free(llm)


def test_preemption_under_a_small_pool(tiny_llama, reference):
    # 10 pages of 16 tokens; the four sequences need 14 at the end, so some must be preempted
    import torch
    from sparsekv.cache.kv_cache import KVCache
    per_page = KVCache.bytes_per_page(2, 16, 2, 16, torch.float32)
    tokens, llm = run(tiny_llama, max_num_seqs=8, max_model_len=128, kv_cache_memory=10 * per_page)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens == reference
    assert_pool_free(llm)


def test_chunked_prefill_every_prompt(tiny_llama, reference):
    tokens, llm = run(tiny_llama, max_num_seqs=8, max_num_batched_tokens=7)
    assert tokens == reference
    assert_pool_free(llm)


def test_prefix_cache_hits(tiny_llama):
    shared = "the sky is blue and the grass is green and the sun is light " * 4
    llm = LLM(tiny_llama, max_model_len=512, max_num_seqs=4)
    first = llm.generate([shared + "one"], GREEDY, use_tqdm=False)[0]
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hits
    second = llm.generate([shared + "one", shared + "two"], GREEDY, use_tqdm=False)
    assert bm.prefix_hits - hits_before >= 2 * 16 * (len(first.prompt_token_ids) // 16 - 1)
    assert second[0].num_cached_tokens > 0
    assert second[0].outputs[0].token_ids == first.outputs[0].token_ids
    cold = LLM(tiny_llama, max_model_len=512, enable_prefix_caching=False)
    assert cold.generate([shared + "two"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        second[1].outputs[0].token_ids


def test_seeded_sampling_reproduces_and_top_k_1_is_greedy(tiny_llama, reference):
    llm = LLM(tiny_llama, max_model_len=512)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    a = llm.generate(PROMPTS, p, use_tqdm=False)
    b = llm.generate(PROMPTS[::-1], p, use_tqdm=False)[::-1]
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    k1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, k1, use_tqdm=False)] == reference


def test_n_logprobs_and_penalties(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=512)
    out = llm.generate(["the cat"], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, logprobs=2,
                                                   ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 8
        assert all(tok in lp and len(lp) >= 2 for tok, lp in zip(c.token_ids, c.logprobs))
    rep = llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   frequency_penalty=2.0), use_tqdm=False)[0]
    ids = rep.outputs[0].token_ids
    assert max(ids.count(t) for t in ids) < 24


def test_stop_strings_cut_text(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=512)
    full = llm.generate(["the cat"], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = full[5:8]
    cut = llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[:full.find(stop)]
    kept = llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                    include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:full.find(stop) + len(stop)]


def test_abort_frees_pages_at_once(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=512)
    engine = llm.engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < len(engine.block_manager.blocks)
    engine.abort_request("a")
    engine.abort_request("b")
    assert_pool_free(llm)


def test_bad_requests_are_clear_errors(tiny_llama, tmp_path):
    llm = LLM(tiny_llama, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(["word " * 100], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown prefill attention method"):
        llm.generate(["hi"], GREEDY, sparsity={"prefill": {"method": "nope"}}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_max_model_len_finishes_with_length(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=40)
    ids = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(ids) + len(out.outputs[0].token_ids) == 40


def test_prefix_cache_is_not_shared_across_sparsity_configs(tiny_llama4):
    llm = LLM(tiny_llama4, max_model_len=512)
    prompt = PROMPTS[2]
    llm.generate([prompt], GREEDY, use_tqdm=False)
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    other = llm.generate([prompt], GREEDY, sparsity={"min_context": 1}, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0
    sparse_prefill = {"prefill": {"method": "xattention", "block_size": 16, "threshold": 0.5}}
    assert llm.generate([prompt], GREEDY, sparsity=sparse_prefill, use_tqdm=False)[0].num_cached_tokens == 0
    # sparse decode leaves the prompt's K/V as dense prefill made them: those pages are shared
    quest = llm.generate([prompt], GREEDY, sparsity={"decode": {"method": "quest"}}, use_tqdm=False)[0]
    assert quest.num_cached_tokens == again.num_cached_tokens


@pytest.mark.parametrize("extreme", [dict(temperature=1e-300), dict(temperature=1e30),
                                     dict(temperature=1.0, repetition_penalty=5e-324),
                                     dict(temperature=1.0, top_p=1e-9, min_p=1.0)])
def test_extreme_sampling_values_never_raise(tiny_llama, extreme):
    llm = LLM(tiny_llama, max_model_len=128)
    out = llm.generate(["the cat", "the dog"], SamplingParams(max_tokens=4, ignore_eos=True, seed=0, **extreme),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
