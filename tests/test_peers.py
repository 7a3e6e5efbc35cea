"""benchmarks/peers.py's own parts on tiny checkpoints: the F32/F16 GGUF llama.cpp gets, the offline
transformers timing, and the results file that never reruns a finished cell."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekv.engine.gguf_loader import gguf_tensors
from sparsekv.engine.loader import load_tokenizer, read_config
from tiny_gguf import build_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers_offline  # noqa: E402
import peers_report  # noqa: E402
from peers_setup import write_gguf_as  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("peers"))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    cfg = read_config(path)
    return dict(gguf_tensors(path, cfg["num_attention_heads"], cfg["num_key_value_heads"]))


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_gguf_rewritten_from_the_same_weights(tiny, tmp_path, qtype):
    src = tiny[1]
    out = write_gguf_as(src, tmp_path / f"tiny.{qtype}.gguf", qtype)
    assert read_config(out) == read_config(src)
    assert load_tokenizer(out).encode("hello world") == load_tokenizer(src).encode("hello world")
    a, b = tensors(src), tensors(out)
    assert a.keys() == b.keys()
    for name, w in a.items():
        exact = qtype == "F32" or w.ndim == 1  # norms stay F32
        expect = w if exact else w.to(torch.float16).to(torch.float32)
        assert torch.equal(b[name], expect), name


def test_offline_transformers_times_every_token(tiny):
    engine = peers_offline.Transformers(str(tiny[0]), 1, {})
    ids = [5, 6, 7, 8, 9, 10]
    prompts = [engine.tok.decode(ids), engine.tok.decode(ids[::-1])]
    reqs = engine.run(prompts, 2, 4)
    for r in reqs:
        assert r["ok"] and r["output_len"] == 4 and len(r["itl"]) == 3
        assert r["prompt_len"] == len(engine.tok(prompts[0]).input_ids)
        assert 0 < r["ttft"] <= r["latency"] and np.isclose(r["ttft"] + sum(r["itl"]), r["latency"])


def test_results_keep_finished_cells_and_retry_failed(tmp_path):
    path = tmp_path / "peers.json"
    shape = {"num_prompts": 2, "output_len": 16}
    res = peers_report.Results(path, {"cpu": {}}, shape)
    res.cell("a|2048|c1", lambda: {"median_ttft_ms": 1.0, "median_tpot_ms": 2.0})
    res.cell("b|2048|c1", lambda: 1 / 0)
    again = peers_report.Results(path, {"cpu": {}}, shape)
    assert again.done("a|2048|c1") and not again.done("b|2048|c1")
    assert not peers_report.Results(path, {}, {**shape, "output_len": 64}).done("a|2048|c1")  # another shape: rerun
    assert "ZeroDivisionError" in again.data["cells"]["b|2048|c1"]["error"]
    again.peer("a")["precision"] = "f32"
    again.peer("c")["setup_error"] = "RuntimeError: no compiler"
    again.peer("d")["run_error"] = "RuntimeError: server exited"
    md = peers_report.write(again.data, tmp_path / "peers")[-1].read_text()
    assert "| a | f32 |  | 1 / 2.0 |" in md and "- c: RuntimeError: no compiler" in md
    assert "- d: RuntimeError: server exited" in md
    assert json.loads(path.read_text())["cells"]["a|2048|c1"]["median_tpot_ms"] == 2.0
