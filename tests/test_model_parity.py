"""sparsekv's model code against transformers on the same safetensors weights."""
from __future__ import annotations

import pytest
import torch
import transformers

from sparsekv import LLM, SamplingParams
from tiny_model import build_model

ARCHS = {  # rope variants with a small max_position_embeddings, so the tests run past it
    "llama": {},
    "llama3_rope": {"max_position_embeddings": 16,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "linear_rope": {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "yarn_rope": {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    "yarn_mscale_rope": {"max_position_embeddings": 64,
                         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                          "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5}},
    "dynamic_rope": {"max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
    "tied": {"tie": True},
}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    arch = name if name in ("qwen2", "qwen3", "mistral") else "llama"
    path = build_model(tmp_path_factory.mktemp(name), arch, **ARCHS[name])
    llm = LLM(str(path), max_model_len=256, max_num_seqs=4, dtype="float32")
    return llm, path


def hf_model(path, **config):
    """A fresh transformers model: its dynamic rope keeps state across calls (the longest length
    seen), so each reference sequence gets its own."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **config).eval()


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    llm, path = checkpoint
    runner, bm, engine = llm.engine.runner, llm.engine.block_manager, llm.engine
    ids = llm.tokenizer.encode("the red cat and the blue dog remember the pass key 12345")
    full = hf_logits(hf_model(path), ids, [5, 7, 9])
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


def hf_logits(model, ids: list[int], forced: list[int]) -> torch.Tensor:
    """transformers' logits at every position, prefill then one forced token per step (dynamic
    rope depends on the length of each step, so one full forward would differ)."""
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        rows, past = [res.logits[0]], res.past_key_values
        for tok in forced:
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            rows.append(res.logits[0])
            past = res.past_key_values
    return torch.cat(rows)


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
    llm, path = checkpoint
    prompts = ["hello world one two", "the sky is blue and the grass is green and the sun"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.outputs[0].token_ids == hf_greedy(hf_model(path), ids, 32)
        assert out.prompt_token_ids == ids


@pytest.mark.parametrize("scaling,max_len", [
    ({"rope_type": "yarn", "factor": 2.0}, 8192),
    ({"rope_type": "dynamic", "factor": 4.0}, 16384),
])
def test_hf_overrides_set_rope_scaling_and_max_model_len(tmp_path, scaling, max_len):
    """`hf_overrides` (vLLM's spelling) scales the rope of a checkpoint saved without it, as
    transformers does with the same config change, and the default max_model_len follows."""
    path = build_model(tmp_path / "m", "llama")
    llm = LLM(str(path), hf_overrides={"rope_scaling": scaling}, max_num_seqs=1, dtype="float32",
              kv_cache_memory=2**24)
    assert llm.engine.config.max_model_len == max_len
    prompt = "the sky is blue and the grass is green and the sun"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model(path, rope_scaling={**scaling, "rope_theta": 10000.0}),
                                                    llm.tokenizer.encode(prompt), 8)
