"""`sparsekv eval` end to end on a tiny random Llama: in-process, resumed, and through a real
`sparsekv serve` subprocess (which must give the same scores and texts)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sparsekv.cli import main

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--tasks", "niah_single,vt", "--lengths", "256,512", "--samples", "2", "--max-tokens", "8"]
ENGINE = ["--dtype", "float32", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from eval_tokenizer import build_model

    return build_model(tmp_path_factory.mktemp("tiny-eval-model"), layers=3)


@pytest.fixture(scope="module")
def methods(tmp_path_factory) -> str:
    """dense, and a SparsityConfig JSON file (sent as the request's "sparsity" over HTTP)."""
    path = tmp_path_factory.mktemp("methods") / "dense_first_layer.json"
    path.write_text(json.dumps({"dense_layers": [0]}))
    return f"dense,{path}"


@pytest.fixture(scope="module")
def local_out(model_dir, methods, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-local")
    assert main(["eval", "--model", str(model_dir), *GRID, "--methods", methods, "--output", str(out), *ENGINE]) == 0
    return out


def _records(out: Path) -> dict[tuple, dict]:
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["task"], r["length"], r["method"].split("/")[-1], r["index"]): r for r in recs}


def test_in_process_run_writes_results_and_resumes(local_out, model_dir, methods):
    data = json.loads((local_out / "results.json").read_text())
    assert data["model"] == model_dir.name
    assert len(data["rows"]) == 2 * 2 * 2
    for row in data["rows"]:
        assert row["n"] == 2 and row["n_failed"] == 0 and 0.0 <= row["score"] <= 100.0
        assert 0.0 < row["attended_fraction"] <= 1.0 and row["prefill_seconds"] > 0
    recs = _records(local_out)
    assert len(recs) == 16 and all(r["prompt_tokens"] == r["length"] for r in recs.values())
    assert "## Scores: dense" in (local_out / "report.md").read_text()
    for png in ("score_vs_length.png", "score_vs_attended.png", "needle_heatmap_dense.png"):
        assert (local_out / png).stat().st_size > 1000
    lines = (local_out / "samples.jsonl").read_text()
    assert main(["eval", "--model", str(model_dir), *GRID, "--methods", methods, "--output", str(local_out),
                 *ENGINE]) == 0
    assert (local_out / "samples.jsonl").read_text() == lines  # everything was cached


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sparsekv.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--max-model-len", "1024", "--no-enable-prefix-caching", *ENGINE],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        assert proc.poll() is None, f"the server exited; see {log.name}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize("tokenize_with", ["local", "server"])
def test_endpoint_gives_the_same_results(local_out, server, model_dir, methods, tmp_path, tokenize_with):
    out = tmp_path / "eval-endpoint"
    assert main(["eval", "--endpoint", server, "--model", str(model_dir), "--tokenize-with", tokenize_with,
                 *GRID, "--methods", methods, "--output", str(out)]) == 0
    local, remote = _records(local_out), _records(out)
    assert remote.keys() == local.keys()
    for k, r in remote.items():
        assert r["error"] is None and r["prompt_tokens"] == r["length"]
        assert (r["text"], r["score"]) == (local[k]["text"], local[k]["score"]), k
        assert r["prefill_attended_fraction"] == pytest.approx(local[k]["prefill_attended_fraction"])
    def scores(d: Path) -> dict:
        return {(r["task"], r["length"], r["method"]): r["score"]
                for r in json.loads((d / "results.json").read_text())["rows"]}
    assert scores(out) == scores(local_out)
