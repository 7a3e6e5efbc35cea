"""Streaming (SSE): chunks add up to the non-streamed text, [DONE] ends every stream, 64
concurrent streams each match the offline engine, and a client that leaves frees its pages."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import API_KEY, MODEL_NAME, make_prompts, metric, pool_idle, wait_until  # noqa: E402
from sparsekv import SamplingParams  # noqa: E402

pytest_plugins = ["api_fixtures"]

GREEDY = dict(temperature=0, max_tokens=12)


def sse_events(http: httpx.Client, path: str, body: dict) -> list[str]:
    """The raw `data:` payloads of one stream, checking the SSE framing on the way."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_completion_stream_matches_whole(http, client):
    prompt = make_prompts(1, seed=10)[0]
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, n=2, **GREEDY)
    events = sse_events(http, "/v1/completions", {"prompt": prompt, "n": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}, **GREEDY})
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert usage["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    for index in (0, 1):
        parts = [ch for c in chunks[:-1] for ch in c["choices"] if ch["index"] == index]
        assert "".join(p["text"] for p in parts) == whole.choices[index].text
        assert [p["finish_reason"] for p in parts][-1] == whole.choices[index].finish_reason
        assert all(p["finish_reason"] is None for p in parts[:-1])


def test_chat_stream_with_openai_client(client, offline):
    messages = [{"role": "user", "content": "remember the magic number"}]
    want = offline.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_64_concurrent_streams(http, async_client_factory, offline):
    prompts = make_prompts(64, seed=11, words=(2, 40))
    want = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)]

    async def one(client, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        async with async_client_factory() as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    got = asyncio.run(main())
    assert got == want
    assert wait_until(lambda: pool_idle(http), timeout=10)


def test_client_disconnect_mid_stream_aborts(http, api_server):
    aborted = metric(http, "request_success_total", finished_reason="abort")
    body = {"prompt": "the cat", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generation is under way
    # the connection is closed: the request is aborted, not run to its 480 tokens
    assert wait_until(lambda: metric(http, "request_success_total", finished_reason="abort") == aborted + 1, 10)
    assert wait_until(lambda: pool_idle(http), timeout=5)


def test_client_disconnect_while_waiting_for_whole_response(http, api_server):
    aborted = metric(http, "request_success_total", finished_reason="abort")
    body = {"prompt": "the dog", "max_tokens": 480, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api_server}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(60, read=0.02))  # 480 engine steps take far longer
    assert wait_until(lambda: metric(http, "request_success_total", finished_reason="abort") == aborted + 1, 10)
    assert wait_until(lambda: pool_idle(http), timeout=5)
    assert time.monotonic() - start < 10


def test_streamed_logprobs_add_up_to_whole(client):
    kw = dict(model=MODEL_NAME, prompt="the sky is blue", max_tokens=6, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(p, field) for p in parts if p), []) == getattr(whole, field), field
    chat = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    whole_chat = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **chat)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == whole_chat
