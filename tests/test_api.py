"""The OpenAI-compatible server, non-streamed: outputs equal the offline engine's, usage is right,
and the side endpoints answer as vLLM's do. A real `sparsekv serve` process, real clients."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import MAX_MODEL_LEN, MODEL_NAME, make_prompts, metric  # noqa: E402
from sparsekv import SamplingParams  # noqa: E402

pytest_plugins = ["api_fixtures"]

GREEDY = dict(temperature=0, max_tokens=12)


def offline_texts(offline, prompts, **kw) -> list[str]:
    params = SamplingParams(**{**GREEDY, **kw})
    return [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]


def test_side_endpoints(http, client, api_server):
    import httpx

    assert httpx.get(f"{api_server}/health").status_code == 200  # no key needed
    assert http.get("/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    tok = http.post("/tokenize", json={"prompt": "the cat is blue"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "the cat is blue"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                        "return_token_strs": True}).json()
    assert "<|assistant|>" in chat["token_strs"]


def test_completions_equal_offline(client, offline):
    prompts = make_prompts(3, seed=1)
    want = offline_texts(offline, prompts)
    for prompt, text in zip(prompts, want):
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY)
        assert r.choices[0].text == text
        assert r.object == "text_completion" and r.model == MODEL_NAME
    batch = client.completions.create(model=MODEL_NAME, prompt=prompts, **GREEDY)  # a list of prompts
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == want


def test_token_id_prompts_and_usage(client, offline):
    prompts = make_prompts(2, seed=2)
    ids = [offline.tokenizer.encode(p) for p in prompts]
    want = offline.generate(ids, SamplingParams(**GREEDY), use_tqdm=False)
    r = client.completions.create(model=MODEL_NAME, prompt=ids, **GREEDY)
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in want]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    assert r.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    sparsity = r.usage.model_extra["sparsity"]
    assert set(sparsity) == {"prefill_attended_fraction", "decode_attended_fraction", "kv_bytes_fraction"}
    single = client.completions.create(model=MODEL_NAME, prompt=ids[0], **GREEDY)  # one token-id list
    assert single.choices[0].text == want[0].outputs[0].text


def test_chat_equals_offline(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat and the dog"}]
    want = offline.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             messages[1]]
    r2 = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == want.outputs[0].text


def test_n_stop_and_seed(client, offline):
    prompt = make_prompts(1, seed=3)[0]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, n=3, **GREEDY)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 1  # greedy: every choice the same
    full = r.choices[0].text
    stop = full.split()[1] if len(full.split()) > 1 else full[-1]
    cut = client.completions.create(model=MODEL_NAME, prompt=prompt, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert cut.choices[0].model_extra["stop_reason"] == stop
    sampled = [client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=1.0,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_logprobs_and_echo(client):
    prompt = "the sky is blue"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) <= 3 and max(t.values()) <= 0 for t in lp.top_logprobs)
    assert all(lp.token_logprobs[i] <= max(lp.top_logprobs[i].values()) + 1e-6 for i in range(4))
    c = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    e = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text == prompt + r.choices[0].text


def test_per_request_sparsity(client, offline):
    prompt = make_prompts(1, seed=4)[0]
    sparsity = {"prefill": {"method": "dense"}, "decode": {"method": "dense"}, "dense_layers": [0]}
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, extra_body={"sparsity": sparsity}, **GREEDY)
    assert r.choices[0].text == offline_texts(offline, [prompt])[0]


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2, "frobnicate": True,
                                           "logit_bias": {}})
    assert r.status_code == 200, r.text


def test_metrics(http, client):
    before = metric(http, "generation_tokens_total", model_name=MODEL_NAME)
    ok = metric(http, "request_success_total", finished_reason="length")
    client.completions.create(model=MODEL_NAME, prompt="the dog", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert metric(http, "generation_tokens_total", model_name=MODEL_NAME) == before + 5
    assert metric(http, "request_success_total", finished_reason="length") == ok + 1
    text = http.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
                 "prompt_tokens_total", "attended_fraction_bucket"):
        assert f"sparsekv:{name}" in text, name
    assert 'phase="prefill"' in text and f'model_name="{MODEL_NAME}"' in text
