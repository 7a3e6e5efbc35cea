"""`bench attention --qkv-from`: q/k/v captured from a real engine run, end to end and faithfully."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from sparsekv.attention.context import Attention
from sparsekv.bench import attention as bench
from sparsekv.bench.captured import Capture
from tiny_model import build_model

LENGTH = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_model(tmp_path_factory.mktemp("model"), layers=3, hidden=128, heads=4, kv_heads=2))


def bench_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--methods", "dense,xattention,quest", "--lengths", str(LENGTH), "--repeats", "1",
                              "--dtype", "float32", *extra])


def test_capture_runs_every_row_and_is_cached(tmp_path, model, monkeypatch):
    args = bench_args("--qkv-from", model, "--output", str(tmp_path))
    assert bench.run(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["inputs"] == {"model": model, "layer": 1, "task": "niah_single", "depth": 0.5, "seed": 0}
    rows = {(r["method"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {("dense", "prefill"), ("xattention", "prefill"), ("dense", "decode"), ("quest", "decode")}
    assert rows[("dense", "decode")]["num_layers"] == 3  # the model's layers by default
    assert all(r["median_ms"] > 0 and 0 < r["attended_fraction"] <= 1 for r in rows.values())
    assert (tmp_path / f"qkv_{LENGTH}.pt").exists()

    def no_prefill(*_):
        raise AssertionError("the cached capture was not reused")
    monkeypatch.setattr(Capture, "capture", no_prefill)
    assert bench.run(bench_args("--qkv-from", model, "--output", str(tmp_path), "--methods", "dense,quest")) == 0


def test_captured_qkv_reproduce_the_layers_attention(tmp_path, model):
    """The dense backend on the captured pool gives what the layer's attention gave in the engine."""
    from sparsekv.attention.backend import AttnShape, get_backend

    cap = Capture(model, 2, "passkey", 0, tmp_path, LENGTH)
    attn = next(m for m in cap.llm.engine.runner.model.modules() if isinstance(m, Attention) and m.layer == 2)
    outputs = []
    hook = attn.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
    try:
        q, k, v = cap.capture(LENGTH).values()
    finally:
        hook.remove()
    assert q.shape == (LENGTH + 1, 4, 32) and k.shape == v.shape == (2, LENGTH + 1, 32)
    expected = torch.cat(outputs)
    case = bench.Case(LENGTH, q, k, v, bench_args("--output", str(tmp_path)), torch.device("cpu"))
    dense = get_backend("dense", bench.resolve("dense")[1], "cpu")
    shape = AttnShape(1, 4, 2, 32, 32 ** -0.5)
    for phase, rows, got_q in (("prefill", slice(0, LENGTH), case.q), ("decode", slice(LENGTH, None), case.q_decode)):
        group = case.group(phase, got_q.shape[0], LENGTH + (phase == "decode"))
        got = dense.forward(got_q, case.kv, 0, dense.plan(group, shape))
        torch.testing.assert_close(got, expected[rows], rtol=1e-4, atol=1e-5)
