"""The shipped default model (sparsekv/assets/default-model) loads and answers a passkey prompt."""
from pathlib import Path

import pytest
import torch

MODEL_DIR = Path(__file__).resolve().parents[1] / "sparsekv" / "assets" / "default-model"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")


def _require_weights():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"no trained weights yet in {MODEL_DIR} (run scripts/train_default_model.py)")


@pytest.fixture(scope="module")
def tokenizer():
    _require_weights()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    _require_weights()
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_config_is_small_gqa_long_context(model):
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.max_position_embeddings >= 32768
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert size < 40 * 2**20


def test_tokenizer_round_trip(tokenizer):
    text = "The pass key is 71432. Remember it.\nVAR ABCDE = VAR FGHIJ. café, naïve — ok?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer(" 71432", add_special_tokens=False)["input_ids"])
    assert digits[-5:] == ["7", "1", "4", "3", "2"]  # digits are single tokens
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"


def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHello!<|end|>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


@pytest.mark.xfail(strict=True, reason="the shipped checkpoint has not learned retrieval yet (0% passkey at 4K, "
                   "see its model card); strict, so the marker must go once a retrained model passes")
def test_greedy_passkey_1k(model, tokenizer):
    key = "68217"
    hay = " ".join([NOISE] * 30)
    cut = len(hay) // 2
    cut = hay.index(" ", cut)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    prompt = f"{INTRO}\n\n{hay[:cut]}{needle}{hay[cut:]}\n\nWhat is the pass key? The pass key is"
    ids = tokenizer(prompt, return_tensors="pt")
    assert 700 < ids["input_ids"].shape[1] < 1300
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert key in answer, answer


def test_sparsekv_logits_equal_transformers(model, tokenizer):
    from sparsekv import LLM
    from sparsekv.config import DEFAULT_MODEL

    llm = LLM(max_model_len=1024, max_num_seqs=1)  # model=None: the shipped model
    assert Path(DEFAULT_MODEL).resolve() == MODEL_DIR
    ids = tokenizer(f"{INTRO}\n\n{NOISE * 8}\n\nWhat is the pass key?")["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    engine = llm.engine
    engine.add_request("logits", ids, __import__("sparsekv").SamplingParams(max_tokens=1))
    logits = engine.runner.run(engine.scheduler.schedule())[0]
    engine.abort_request("logits")
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
