"""Sparse backends inside the engine: full budget equals dense, small budgets really skip work,
and mixed batches, chunking, preemption and per-request overrides keep each request's output."""
from __future__ import annotations

import pytest
from engine_steps import run_together

from sparsekv import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = ["the sky is blue and the grass is green and the sun is light and the moon is dark " * 6,
           "remember the pass key 71432 " * 12, "hello world one two three"]

FULL = {
    "xattention": {"prefill": {"method": "xattention", "threshold": 1.0, "block_size": 16, "stride": 4}},
    "delta": {"decode": {"method": "delta", "budget": 4096, "recent_pages": 1}},
    "quest": {"decode": {"method": "quest", "budget": 4096}},
}
SMALL = {
    "xattention": {"prefill": {"method": "xattention", "threshold": 0.5, "block_size": 16, "stride": 4}},
    "delta": {"decode": {"method": "delta", "budget": 64, "recent_pages": 1, "delta_layers": [2]}},
    "quest": {"decode": {"method": "quest", "budget": 48}},
}


@pytest.fixture(scope="module")
def llm(tiny_llama4):
    return LLM(tiny_llama4, max_model_len=512, max_num_seqs=8)


@pytest.fixture(scope="module")
def dense(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("method", list(FULL))
def test_full_budget_equals_dense(llm, dense, method):
    outs = llm.generate(PROMPTS, GREEDY, sparsity=FULL[method], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == dense


@pytest.mark.parametrize("method", list(SMALL))
def test_small_budget_attends_less(llm, method):
    out = llm.generate(PROMPTS[:1], GREEDY, sparsity=SMALL[method], use_tqdm=False)[0]
    stats = out.sparsity.as_dict()
    phase = "prefill" if method == "xattention" else "decode"
    assert stats[f"{phase}_attended_fraction"] < 0.95
    other = "decode" if phase == "prefill" else "prefill"
    assert stats[f"{other}_attended_fraction"] == 1.0
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_mixed_batch_chunked_preempted_equals_alone(tiny_llama4):
    """Requests with different methods share batches, chunks and a pool small enough to preempt,
    and each still gets exactly what it gets alone."""
    import torch
    from sparsekv.cache.kv_cache import KVCache
    configs = [SMALL["xattention"], SMALL["delta"], SMALL["quest"], None]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    alone = LLM(tiny_llama4, max_model_len=256, max_num_seqs=1)
    expected = [alone.generate([p], GREEDY, sparsity=c, use_tqdm=False)[0].outputs[0].token_ids
                for p, c in zip(prompts, configs)]
    per_page = KVCache.bytes_per_page(4, 16, 2, 16, torch.float32)
    busy = LLM(tiny_llama4, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=40,
               kv_cache_memory=24 * per_page)
    engine = busy.engine
    got = run_together(engine, {str(i): pc for i, pc in enumerate(zip(prompts, configs))}, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [got[str(i)].token_ids for i in range(4)] == expected
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)
