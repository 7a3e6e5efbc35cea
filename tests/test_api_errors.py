"""Every bad input gets its status in the OpenAI error envelope and leaves the server serving
the same outputs; a full waiting queue gets 429; shutdown drains and then aborts."""
from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import thread_server, wait_until  # noqa: E402

pytest_plugins = ["api_fixtures"]

OK = {"prompt": "the cat", "max_tokens": 4, "temperature": 0}
LONG_PROMPT = "one two three four five six seven " * 120  # well over 512 tokens

BAD_COMPLETIONS = {
    "wrong type": {"prompt": 5},
    "empty prompt list": {"prompt": []},
    "negative max_tokens": {**OK, "max_tokens": -1},
    "zero max_tokens": {**OK, "max_tokens": 0},
    "string max_tokens": {**OK, "max_tokens": "many"},
    "negative temperature": {**OK, "temperature": -0.5},
    "top_p zero": {**OK, "top_p": 0},
    "too many logprobs": {**OK, "logprobs": 50},
    "negative token id": {"prompt": [1, -2, 3]},
    "token id out of vocabulary": {"prompt": [1, 10**6]},
    "prompt longer than max_model_len": {"prompt": LONG_PROMPT},
    "prompt plus max_tokens too long": {"prompt": "the cat", "max_tokens": 600},
    "unknown sparsity method": {**OK, "sparsity": {"prefill": {"method": "nope"}}},
    "bad sparsity param": {**OK, "sparsity": {"dense_layers": "all"}},
    "xattention threshold out of range": {**OK, "sparsity": {"prefill": {"method": "xattention", "threshold": 7}}},
    "quest budget below 3 pages": {**OK, "sparsity": {"decode": {"method": "quest", "budget": 8}}},
    "delta layer past the model": {**OK, "sparsity": {"decode": {"method": "delta", "delta_layers": [99]}}},
    "ffn sparsity out of range": {**OK, "sparsity": {"ffn": {"method": "teal", "sparsity": 1.5}}},
    "ffn method without calibrated thresholds": {**OK, "sparsity": {"ffn": {"method": "chess", "sparsity": 0.5}}},
    "stream_options without stream": {**OK, "stream_options": {"include_usage": True}},
    "n too large": {**OK, "n": 10**6},
    "seed out of range": {**OK, "seed": 2**70},
    "echo with logprobs": {**OK, "echo": True, "logprobs": 1},
    "stop of wrong type": {**OK, "stop": 3},
}
BAD_CHAT = {
    "no messages": {"messages": []},
    "message without role": {"messages": [{"content": "hi"}]},
    "image content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    "top_logprobs without logprobs": {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    "bad template kwargs": {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": 1}},
}


def assert_envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


@pytest.fixture(scope="module")
def baseline(http) -> str:
    return http.post("/v1/completions", json=OK).json()["choices"][0]["text"]


@pytest.mark.parametrize("case", BAD_COMPLETIONS)
def test_bad_completion_is_400(http, baseline, case):
    body = BAD_COMPLETIONS[case]
    assert_envelope(http.post("/v1/completions", json=body), 400)
    if case != "stream_options without stream":  # streamed requests fail before the stream starts
        assert_envelope(http.post("/v1/completions", json={**body, "stream": True}), 400)
    assert http.post("/v1/completions", json=OK).json()["choices"][0]["text"] == baseline


@pytest.mark.parametrize("case", BAD_CHAT)
def test_bad_chat_is_400(http, case):
    assert_envelope(http.post("/v1/chat/completions", json=BAD_CHAT[case]), 400)


def test_bad_json_and_tokenize_inputs(http):
    headers = {"content-type": "application/json"}
    err = assert_envelope(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert "JSON" in err["message"]
    assert_envelope(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_envelope(http.post("/tokenize", json={}), 400)
    assert_envelope(http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)
    assert_envelope(http.post("/detokenize", json={"tokens": [10**6]}), 400)


def test_validation_names_the_field(http):
    err = assert_envelope(http.post("/v1/completions", json={**OK, "temperature": -1}), 400)
    assert err["param"] == "temperature" and err["type"] == "BadRequestError"


def test_unknown_model_and_route_are_404(http, client):
    import openai

    err = assert_envelope(http.post("/v1/completions", json={**OK, "model": "gpt-9"}), 404)
    assert "gpt-9" in err["message"]
    assert_envelope(http.get("/v1/models/gpt-9"), 404)
    assert_envelope(http.get("/v2/nothing"), 404)
    assert_envelope(http.get("/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_api_key_is_required(api_server):
    for path in ("/v1/models", "/metrics", "/version", "/openapi.json"):
        assert_envelope(httpx.get(api_server + path), 401)
        assert_envelope(httpx.get(api_server + path, headers={"Authorization": "Bearer wrong"}), 401)
    assert_envelope(httpx.post(f"{api_server}/v1/completions", json=OK), 401)
    assert httpx.get(f"{api_server}/health").status_code == 200


def test_body_too_large_is_413(http):
    big = json.dumps({"prompt": "x" * (2**20 + 10)}).encode()
    assert_envelope(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the actual bytes are counted
        for _ in range(20):
            yield b" " * 2**16
    assert_envelope(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert http.post("/v1/completions", json=OK).status_code == 200


def test_full_waiting_queue_is_429(tiny_llama):
    with thread_server(tiny_llama, max_waiting_requests=2, max_num_seqs=1) as (url, _, _):
        body = {"prompt": "the cat", "max_tokens": 40, "ignore_eos": True}

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

        codes = sorted(r.status_code for r in asyncio.run(main()))
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
        rejected = next(r for r in asyncio.run(main()) if r.status_code == 429)
        assert_envelope(rejected, 429)
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def test_graceful_shutdown(tiny_llama):
    with thread_server(tiny_llama, shutdown_timeout=0.02) as (url, server, engine):  # << 480 steps
        body = {"prompt": "the cat", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
            assert not engine.accepting
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream still ended properly...
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "abort"  # ...aborted after the grace period
        assert wait_until(lambda: not engine.healthy, timeout=15)
        assert engine.stats().num_free_pages == engine.stats().num_total_pages


def test_draining_server_refuses_new_work(tiny_llama):
    with thread_server(tiny_llama) as (url, _, engine):
        engine.begin_shutdown(60.0)
        assert_envelope(httpx.get(f"{url}/health"), 503)
        assert_envelope(httpx.post(f"{url}/v1/completions", json=OK), 503)


def test_engine_failure_mid_stream_is_an_error_event(tiny_llama):
    with thread_server(tiny_llama) as (url, _, engine):
        def fail_once():  # a fault injected into the real engine, as a bug in a step would raise
            del engine.engine.step
            raise RuntimeError("injected fault")

        body = {"prompt": "the cat", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            engine.engine.step = fail_once
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == 500 and "injected fault" in error["message"]
        assert wait_until(lambda: engine.stats().num_free_pages == engine.stats().num_total_pages, timeout=5)
        assert httpx.post(f"{url}/v1/completions", json=OK, timeout=60).status_code == 200
