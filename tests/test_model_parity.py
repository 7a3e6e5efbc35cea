"""sparsekv's model code against transformers on the same safetensors weights."""
from __future__ import annotations

import json

import pytest
import torch

from sparsekv import LLM, SamplingParams
from parity import engine_logits, hf_greedy, hf_logits, hf_model
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
    "head_dim_64": {"hidden": 192, "heads": 3, "kv_heads": 1},  # SmolLM2's head dim: the compiled decode kernel
}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    arch = name if name in ("qwen2", "qwen3", "mistral") else "llama"
    path = build_model(tmp_path_factory.mktemp(name), arch, **ARCHS[name])
    llm = LLM(str(path), max_model_len=256, max_num_seqs=4, dtype="float32")
    return llm, path


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    llm, path = checkpoint
    ids = llm.tokenizer.encode("the red cat and the blue dog remember the pass key 12345")
    forced = [5, 7, 9]
    ref = hf_logits(hf_model(path), ids, forced)[len(ids) - 1:]
    torch.testing.assert_close(engine_logits(llm, ids, forced), ref, rtol=1e-4, atol=1e-4)


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


def test_hf_overrides_flag_takes_json():
    from sparsekv.cli import build_parser, engine_config_from_args

    scaling = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    argv = ["generate", "--input", "in.jsonl", "--output", "out.jsonl", "--model", "m",
            "--hf-overrides", json.dumps(scaling)]
    assert engine_config_from_args(build_parser(argv).parse_args(argv)).hf_overrides == scaling


def test_dynamic_rope_chunked_prefill_matches_one_forward(tmp_path):
    """A prompt prefilled in chunks rotates every chunk with the whole prompt's length, as
    transformers' single forward over it does, so the logprobs after the prompt match."""
    path = build_model(tmp_path, "llama", **ARCHS["dynamic_rope"])
    llm = LLM(str(path), max_model_len=256, max_num_batched_tokens=8, dtype="float32")
    ids = llm.tokenizer.encode("the red cat and the blue dog remember the pass key 12345 and the moon")
    assert len(ids) > 16  # past max_position_embeddings (8), in 3+ chunks
    with torch.no_grad():
        want = torch.log_softmax(hf_model(path)(torch.tensor([ids])).logits[0, -1].float(), -1)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    got = out.outputs[0].logprobs[0]
    torch.testing.assert_close(torch.tensor(list(got.values())), want[list(got)], rtol=1e-4, atol=1e-4)
