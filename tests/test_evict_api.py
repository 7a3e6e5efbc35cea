"""Eviction through the server: bad parameters answer 400; an evicting request reports its
kept KV fraction in usage and in the kv_bytes_fraction metric."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import metric  # noqa: E402

pytest_plugins = ["api_fixtures"]

PROMPT = "one two three four five six seven " * 30


@pytest.mark.parametrize("kv", [
    {"evict": "lru"},
    {"evict": "snapkv", "budget": 8},
    {"evict": "snapkv", "evict_params": {"pool": "median"}},
    {"evict": "h2o", "evict_params": {"recent_ratio": 3}},
    {"evict_params": {"window": 8}},
])
def test_bad_eviction_params_are_400(http, kv):
    r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2, "sparsity": {"kv": kv}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == 400


def test_evicting_request_reports_kept_fraction(http):
    before = metric(http, "kv_bytes_fraction_sum")
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "sparsity": {"kv": {"evict": "streamingllm", "budget": 64}}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    frac = usage["sparsity"]["kv_bytes_fraction"]
    assert frac == pytest.approx(64 / (usage["prompt_tokens"] + 3))
    assert metric(http, "kv_bytes_fraction_sum") - before == pytest.approx(frac)
