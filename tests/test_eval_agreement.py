"""Agreement with dense, block recall, model lengths, chat prompts and per-sample progress,
on a tiny random Llama."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from sparsekv import LLM
from sparsekv.cli import main
from sparsekv.config import SparsityConfig, preset
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval import blocks, lengths, tasks
from sparsekv.eval.agreement import agreement, forced_run, summarize
from sparsekv.eval.capture import Capture, capture
from sparsekv.eval.runner import LocalRunner

XATTN = {"prefill": {"method": "xattention", "block_size": 16, "stride": 4, "threshold": 0.5}, "dense_layers": [0]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from eval_tokenizer import build_model

    return build_model(tmp_path_factory.mktemp("tiny-agreement-model"), layers=3)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", enable_prefix_caching=False, max_num_seqs=1,
               max_model_len=1024)


@pytest.fixture(scope="module")
def count(llm):
    return lambda text: len(llm.tokenizer.encode(text))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


def test_forced_run_reproduces_greedy_and_forces_tokens(llm, count):
    s = tasks.generate("passkey", 200, 0, count)
    picked = llm.generate([s.prompt], greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    assert forced_run(llm.engine, s.prompt, SparsityConfig(), 8, None, Capture()) == picked
    forced = [5] * 8  # not what the model picks: the picks after the first depend on the forcing
    with capture(llm.engine.runner.model) as cap:
        picks = forced_run(llm.engine, s.prompt, SparsityConfig(), 8, forced, cap)
    assert len(picks) == 8 and picks[0] == picked[0]
    ids = llm.tokenizer.encode(s.prompt)
    for i in (1, 5):  # pick i is the greedy token after the prompt and forced[:i]
        assert llm.generate([ids + forced[:i]], greedy(1), use_tqdm=False)[0].outputs[0].token_ids == [picks[i]]
    pos, rows = cap.attention(0)
    assert pos.tolist() == list(range(200 + 7)) and rows.shape[0] == 207  # every forced token decoded once


def test_dense_agrees_with_itself_and_xattention_reports_recall(llm, count):
    samples = [tasks.generate("passkey", 256, i, count) for i in range(2)]
    methods = {"dense": preset("dense"), "same": SparsityConfig(dense_layers=(0, 1, 2)),
               "xattention": SparsityConfig.model_validate(XATTN)}
    recs = agreement(llm, samples, methods, (1, 2))
    assert len(recs) == 4
    for r in recs:
        if r["method"] == "same":
            assert r["top1_agreement"] == 1.0 and max(r["attn_rel_error"]["prefill"]) < 1e-5
            assert "block_recall" not in r
        else:
            assert r["attn_rel_error"]["prefill"][0] < 1e-5 < max(r["attn_rel_error"]["prefill"])  # layer 0 dense
            assert set(r["block_recall"]) == {"1", "2"}
            rec = r["block_recall"]["2"]
            assert 0.5 <= rec["mass_recall"] <= 1.0 and 0 < rec["density"] < 1 and 0 <= rec["topk_recall"] <= 1
    rows = summarize(recs)
    assert {r["method"] for r in rows} == {"same", "xattention"}
    assert len(rows[0]["prefill_rel_error_by_layer"]) == 3


def test_block_mass_rows_sum_to_one_and_full_selection_recalls_all():
    torch.manual_seed(0)
    q, k = torch.randn(4, 100, 8), torch.randn(2, 100, 8)
    m = blocks.block_mass(q, k, 16)
    assert m.shape == (4, 7, 7)
    assert torch.allclose(m.sum(-1), torch.ones(4, 7), atol=1e-5)
    assert float(m.triu(1).abs().sum()) == 0.0  # causal
    last = blocks.block_mass(q, k, 16, rows=slice(99, 100))
    assert last.shape == (4, 1, 7) and torch.allclose(last.sum(-1), torch.ones(4, 1), atol=1e-5)
    full = torch.ones(7, 7, dtype=torch.bool).tril().expand(4, -1, -1)
    r = blocks.recall(m, full)
    assert r["mass_recall"] == pytest.approx(1.0) and r["topk_recall"] == 1.0 and r["density"] == 1.0
    sel, size = blocks.xattention_selection({"block_size": 16, "stride": 4, "threshold": 0.9}, 1, q, k)
    assert size == 16 and sel.shape == (4, 7, 7) and bool(sel.diagonal(dim1=1, dim2=2).all())


def test_model_max_len_reads_config_and_rope_scaling(model_dir):
    assert lengths.model_max_len(str(model_dir)) == 4096
    yarn = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}
    assert lengths.model_max_len(str(model_dir), yarn) == 16384
    assert lengths.rope_override(yarn) and not lengths.rope_override(None)


def test_cells_default_clip_and_explicit_skip(caplog):
    budgets = {"passkey": 32, "niah_single": 128}
    assert lengths.cells(["passkey", "niah_single"], None, budgets, 8192, False) == [
        ("passkey", 4096), ("passkey", 8064), ("niah_single", 4096), ("niah_single", 8064)]
    with caplog.at_level(logging.INFO):
        got = lengths.cells(["passkey"], [2048, 8192, 16384], budgets, 8192, False)
    assert got == [("passkey", 2048), ("passkey", 8160)]
    assert "skipping length 16384" in caplog.text and "length 8192 clipped to 8160" in caplog.text
    assert lengths.cells(["passkey"], [16384], budgets, 8192, True) == [("passkey", 16384)]


def test_chat_format_wraps_question_and_keeps_exact_length(llm, count):
    tok = llm.tokenizer
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    try:
        s = tasks.generate("niah_single", 300, 1, count, fmt=tasks.chat_format(tok))
    finally:
        tok.chat_template = None
    assert s.prompt.startswith("<user>Some special magic") and "</user><bot>The special magic numbers" in s.prompt
    assert s.prompt_tokens == 300 == count(s.prompt)
    assert tasks.ANSWER not in s.prompt
    with pytest.raises(ValueError, match="chat template"):
        tasks.chat_format(tok)


def test_local_runner_reports_each_sample_as_it_finishes(llm, count):
    samples = [tasks.generate("passkey", 120 + 40 * i, i, count) for i in range(3)]
    samples = [s.__class__(**{**s.__dict__, "max_tokens": 2 + 6 * i}) for i, s in enumerate(samples)]
    order = []

    def done(s, r):
        order.append((s.index, r.error, llm.engine.has_unfinished_requests()))
    LocalRunner(lambda: llm, "tiny", batch_size=3).run(samples, "dense", preset("dense"), done)
    # each reported as it finished, while the others were still running (not once per batch)
    assert order == [(0, None, True), (1, None, True), (2, None, False)]


def test_cli_agreement_writes_results_and_report(model_dir, tmp_path):
    path = tmp_path / "xattn.json"
    path.write_text(json.dumps(XATTN))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", "passkey", "--lengths", "256", "--samples", "1",
                 "--max-tokens", "4", "--methods", f"dense,{path}", "--agreement", "--output", str(out),
                 "--dtype", "float32", "--device", "cpu"]) == 0
    data = json.loads((out / "results.json").read_text())
    (row,) = data["agreement"]
    assert row["method"] == str(path) and 0 <= row["top1_agreement"] <= 1 and "block_recall" in row
    assert "## Agreement with dense" in (out / "report.md").read_text()
    assert (out / "attention_error_by_layer.png").stat().st_size > 1000
    assert len((out / "agreement.jsonl").read_text().splitlines()) == 1
