"""HiP inside the engine on a tiny checkpoint: full budget equals dense, small budgets attend less
in both phases, and HiP composes per request with the other methods in shared, chunked batches."""
from __future__ import annotations

import pytest

from engine_steps import run_together

from sparsekv import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the sky is blue and the grass is green and the sun is light and the moon is dark " * 6,
           "remember the pass key 71432 " * 12]
HIP = {"method": "hip", "mask_k": 16, "block_size_q": 16, "block_size_k": 4, "sink": 4, "sliding_window": 16,
       "refresh_interval": [4]}
SMALL = {"prefill": HIP, "decode": HIP}
FULL = {"prefill": {**HIP, "mask_k": 4096}, "decode": {**HIP, "mask_k": 4096}}


@pytest.fixture(scope="module")
def llm(tiny_llama4):
    return LLM(tiny_llama4, max_model_len=512, max_num_seqs=4)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_full_budget_equals_dense_and_small_attends_less(llm):
    dense = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert _tokens(llm.generate(PROMPTS, GREEDY, sparsity=FULL, use_tqdm=False)) == dense
    out = llm.generate(PROMPTS[:1], GREEDY, sparsity=SMALL, use_tqdm=False)[0]
    stats = out.sparsity.as_dict()
    assert stats["prefill_attended_fraction"] < 0.95 and stats["decode_attended_fraction"] < 0.95
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_composes_per_request_in_chunked_batches(tiny_llama4):
    """HiP beside Quest decode, XAttention prefill and dense in one chunked batch: each request
    gets what it gets alone (per-slot decode masks do not leak between requests)."""
    configs = [SMALL, {"prefill": HIP, "decode": {"method": "quest", "budget": 48}},
               {"prefill": {"method": "xattention", "threshold": 0.5, "block_size": 16, "stride": 4}, "decode": HIP},
               None]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    alone = LLM(tiny_llama4, max_model_len=512, max_num_seqs=1)
    expected = [alone.generate([p], GREEDY, sparsity=c, use_tqdm=False)[0].outputs[0].token_ids
                for p, c in zip(prompts, configs)]
    engine = LLM(tiny_llama4, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=48).engine
    got = run_together(engine, {str(i): pc for i, pc in enumerate(zip(prompts, configs))}, GREEDY)
    assert [got[str(i)].token_ids for i in range(4)] == expected
