"""The attention seam: per-step routing of mixed batches, backend state released by slot, the
per-device registry, and side tables allocated only for the methods that run."""
from __future__ import annotations

import pytest
import torch

from sparsekv import LLM, SamplingParams
from sparsekv.attention.backend import AttentionBackend, get_backend, register
from sparsekv.attention.dense import DenseBackend
from sparsekv.attention.xattention import XAttentionParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the sky is blue and the grass is green and the sun is light " * 6, "remember the pass key 71432 " * 10,
           "hello world one two three four five six seven", "a b c d e f g h i j k l m n o p " * 5]
# three methods over different layer groups, plus a composed prefill + decode config
CONFIGS = [{"decode": {"method": "quest", "budget": 48}, "dense_layers": [0]},
           {"decode": {"method": "delta", "budget": 64, "recent_pages": 1, "delta_layers": [1]}, "dense_layers": [0]},
           {"prefill": {"method": "xattention", "threshold": 0.5, "block_size": 16, "stride": 4},
            "decode": {"method": "quest", "budget": 48}, "dense_layers": [1, 2]},
           None]


def test_mixed_methods_per_layer_group_equal_each_alone(tiny_llama4):
    alone = LLM(tiny_llama4, max_model_len=256, max_num_seqs=1)
    expected = [alone.generate([p], GREEDY, sparsity=c, use_tqdm=False)[0].outputs[0].token_ids
                for p, c in zip(PROMPTS, CONFIGS)]
    together = LLM(tiny_llama4, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
    engine = together.engine
    for i, (p, c) in enumerate(zip(PROMPTS, CONFIGS)):
        engine.add_request(str(i), p, GREEDY, c)
    got, mixed_steps = {}, 0
    while engine.has_unfinished_requests():
        batch_phases = {s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running}
        mixed_steps += batch_phases == {True, False}
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert mixed_steps > 0  # prefill and decode really shared steps
    assert [got[str(i)] for i in range(4)] == expected


@register
class SlotStateBackend(DenseBackend):
    """Dense attention that keeps a tensor per request slot across steps, as HiP masks or
    eviction scores will: the engine must free it on finish, abort and preemption."""

    name = "test_slot_state"
    phases = ("prefill", "decode")
    state: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def forward(self, q, kv, layer, plan):
        for slot in plan.group.slots_cpu:
            self.state.setdefault(slot, torch.zeros(4))
            self.seen.add(slot)
        return super().forward(q, kv, layer, plan)

    def free(self, slots):
        for s in slots:
            self.state.pop(s, None)


def test_free_releases_state_on_finish_abort_and_preemption(tiny_llama):
    import random

    from sparsekv.cache.kv_cache import KVCache

    per_page = KVCache.bytes_per_page(2, 16, 2, 16, torch.float32)
    llm = LLM(tiny_llama, max_model_len=128, max_num_seqs=8, kv_cache_memory=10 * per_page)
    engine, rng = llm.engine, random.Random(0)
    sp = {"prefill": {"method": "test_slot_state"}, "decode": {"method": "test_slot_state"}, "dense_layers": []}
    for i in range(1000):
        n = 40 if i % 10 == 0 else rng.randint(1, 2)
        engine.add_request(str(i), "one two three " * rng.randint(1, 4),
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), sp)
        if i % 7 == 3:
            engine.step()
            engine.abort_request(str(i - 1))
        if i % 50 == 49:
            while engine.has_unfinished_requests():
                engine.step()
            assert SlotStateBackend.state == {}
    assert engine.scheduler.num_preemptions > 0
    assert SlotStateBackend.state == {} and max(SlotStateBackend.seen) < 8  # slots are reused
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


def test_registry_refuses_unknown_device_or_method():
    with pytest.raises(ValueError, match="no implementation for device 'tpu'"):
        get_backend("xattention", XAttentionParams(), "tpu")
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        get_backend("nope", XAttentionParams(), "cpu")
    assert type(get_backend("xattention", XAttentionParams(), "cuda")).__name__ == "XAttentionTriton"


def test_side_tables_only_for_methods_that_run(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=256)
    cache = llm.engine.runner.kv_cache
    assert cache.specs == {} and "kmin" not in cache.layers[0].side
    out = llm.generate(["the pass key is 123 " * 20], GREEDY, sparsity={"decode": {"method": "quest", "budget": 48}, "dense_layers": []},
                       use_tqdm=False)[0]
    assert "page_bounds" in cache.specs and out.sparsity.decode_attended_fraction < 1
