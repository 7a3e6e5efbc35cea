"""`sparsekv bench serve` against the session server: exact prompt lengths, a complete report."""
from __future__ import annotations

import json

import pytest

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import API_KEY, MODEL_NAME  # noqa: E402
from sparsekv.bench.serve import random_prompts  # noqa: E402
from sparsekv.cli import main  # noqa: E402

pytest_plugins = ["api_fixtures"]


def test_random_prompts_have_exact_length(offline):
    for length in (2, 17, 100):
        for text in random_prompts(offline.tokenizer, 5, length, seed=length):
            assert len(offline.tokenizer.encode(text, add_special_tokens=True)) == length


def test_bench_serve_report(api_server, tiny_llama, tmp_path, capsys):
    code = main(["bench", "serve", "--endpoint", api_server, "--api-key", API_KEY, "--model", tiny_llama,
                 "--num-prompts", "6", "--input-len", "40",
                 "--output-len", "5", "--request-rate", "50", "--burstiness", "2", "--max-concurrency", "3",
                 "--output", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["model"] == MODEL_NAME and report["completed"] == 6 and report["failed"] == 0
    assert report["total_input_tokens"] == 6 * 40 and report["total_output_tokens"] == 6 * 5
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            assert report[f"{stat}_{name}_ms"] >= 0
    assert report["request_throughput"] > 0 and report["output_throughput"] > 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
