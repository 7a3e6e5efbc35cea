"""`sparsekv generate`: resumable JSONL batch generation through the real CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sparsekv import LLM, SamplingParams


def generate(model: str, inp: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsekv.cli", "generate", "--model", model, "--input", str(inp),
                           "--output", str(out), "--max-model-len", "256", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=300)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_resume_malformed_and_empty(tiny_llama, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "a", "prompt": "the cat", "temperature": 0},
             {"id": "b", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 4},
             {"id": "c", "prompt": "the dog is", "temperature": 0}]
    inp.write_text("\n".join(json.dumps(x) for x in lines[:1] + lines[2:]) + "\n{not json\n"
                   + json.dumps({"id": "d"}) + "\n")
    # a partial output from an earlier, killed run: 'a' finished, then a torn line
    llm = LLM(tiny_llama, max_model_len=256)
    a_text = llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    out.write_text(json.dumps({"id": "a", "text": "EARLIER", "finish_reason": "length", "usage": {}}) + "\n{\"id\": \"c\", \"te")
    res = generate(tiny_llama, inp, out)
    assert res.returncode == 0, res.stderr
    recs = {r["id"]: r for r in read(out)}
    assert recs["a"]["text"] == "EARLIER"  # skipped, not regenerated
    assert recs["c"]["finish_reason"] in ("stop", "length") and recs["c"]["usage"]["prompt_tokens"] > 0
    assert "error" in recs["line-3"] and "not JSON" in recs["line-3"]["error"]
    assert "exactly one of" in recs["d"]["error"]
    # rerun with a chat line added: only the new id runs
    inp.write_text(inp.read_text() + json.dumps(lines[1]) + "\n")
    before = len(read(out))
    assert generate(tiny_llama, inp, out).returncode == 0
    new = read(out)[before:]
    assert {r["id"] for r in new if "error" not in r} == {"b"}
    assert new[-1]["usage"]["completion_tokens"] <= 4
    # the same prompt through the API gives the CLI's text
    fresh = tmp_path / "fresh.jsonl"
    inp.write_text(json.dumps(lines[0]) + "\n")
    assert generate(tiny_llama, inp, fresh).returncode == 0
    assert read(fresh)[0]["text"] == a_text


def test_generate_empty_input(tiny_llama, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("")
    res = generate(tiny_llama, inp, out)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == ""
