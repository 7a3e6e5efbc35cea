"""sparsekv's model code against transformers on the same safetensors weights."""
from __future__ import annotations

import pytest
import torch
import transformers

from sparsekv import LLM, SamplingParams
from tiny_model import build_model

ARCHS = {
    "llama": {},
    "llama3_rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
    "tied": {"tie": True},
    "head_dim_64": {"hidden": 192, "heads": 3, "kv_heads": 1},  # SmolLM2's head dim: the compiled decode kernel
}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    arch = name if name in ("qwen2", "qwen3", "mistral") else "llama"
    path = build_model(tmp_path_factory.mktemp(name), arch, **ARCHS[name])
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    llm = LLM(str(path), max_model_len=256, max_num_seqs=4, dtype="float32")
    return llm, ref


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    llm, ref = checkpoint
    runner, bm, engine = llm.engine.runner, llm.engine.block_manager, llm.engine
    ids = llm.tokenizer.encode("the red cat and the blue dog remember the pass key 12345")
    with torch.no_grad():
        full = ref(torch.tensor([ids + [5, 7, 9]])).logits[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("parity", ids, params)
    seq = engine.requests["parity"][0]
    batch = engine.scheduler.schedule()
    logits = runner.run(batch)
    torch.testing.assert_close(logits[0], full[len(ids) - 1], rtol=1e-4, atol=1e-4)
    seq.num_computed_tokens = len(ids)
    for i, tok in enumerate([5, 7, 9]):  # step-by-step decode with forced tokens
        seq.token_ids.append(tok)
        assert bm.allocate(seq, 1)
        logits = runner.run([(seq, 1)])
        seq.num_computed_tokens += 1
        torch.testing.assert_close(logits[0], full[len(ids) + i], rtol=1e-4, atol=1e-4)
    engine.abort_request("parity")
    assert bm.num_free_blocks == len(bm.blocks)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with transformers' forward and its KV cache (EOS not special)."""
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
    return out


def test_greedy_32_tokens_identical(checkpoint):
    llm, ref = checkpoint
    prompts = ["hello world one two", "the sky is blue and the grass is green and the sun"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.outputs[0].token_ids == hf_greedy(ref, ids, 32)
        assert out.prompt_token_ids == ids
