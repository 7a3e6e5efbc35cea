"""Activation-sparse FFN (TEAL, WINA, CHESS) in the engine, on a tiny calibrated checkpoint."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from engine_steps import run_together
from parity import engine_logits

from sparsekv import LLM, SamplingParams, calibrate
from sparsekv.attention.metadata import AttnMetadata, RequestInput
from sparsekv.ffn.calibrate import SITE_MODULES, default_texts, hooked
from sparsekv.ffn.sparse import Rule, keep_mask, prefill_rows, sparse_linear
from sparsekv.ffn.thresholds import FFNThresholds, ThresholdsError

TOKENS = 64  # per calibration text: the tiny model's calibration takes about a second
PROMPT = list(range(20, 60))
FORCED = [7, 300, 12, 90, 45, 3]


@pytest.fixture(scope="module")
def calibrated(tiny_llama4, tmp_path_factory) -> str:
    """All three methods' tables in one file (each run keeps the others' tables)."""
    out = tmp_path_factory.mktemp("ffn") / "thresholds.json"
    for method in ("teal", "wina", "chess"):
        parser = argparse.ArgumentParser()
        calibrate.add_arguments(parser)
        args = parser.parse_args(["--model", tiny_llama4, "--method", method, "--output", str(out),
                                  "--sample-tokens", str(TOKENS)])
        assert calibrate.run(args) == 0
    return str(out)


@pytest.fixture(scope="module")
def llm(tiny_llama4, calibrated) -> LLM:
    return LLM(tiny_llama4, dtype="float32", device="cpu", ffn_thresholds=calibrated, max_num_seqs=4,
               enable_prefix_caching=False)  # calibration measurements run every row


def _ffn(method: str, sparsity: float, **extra) -> dict:
    return {"ffn": {"method": method, "sparsity": sparsity, **extra}}


def _logits(llm: LLM, sparsity: dict | None, ids=PROMPT, forced=FORCED) -> torch.Tensor:
    engine = llm.engine
    old = engine.config.sparsity
    engine.config.sparsity = old.merged(sparsity)
    try:
        return engine_logits(llm, ids, forced)
    finally:
        engine.config.sparsity = old


def test_file_holds_every_method(calibrated):
    th = FFNThresholds.load(calibrated, 4)
    assert set(th.tables) == {"teal", "wina", "chess"} and len(th.channels["chess.up_ms"][0]) == 128
    assert set(th.tables["teal"][0]) == set(SITE_MODULES) and set(th.tables["chess"][3]) == {"gate", "score"}


@pytest.mark.parametrize("table", ["teal", "wina"])
def test_achieved_sparsity_within_one_percent_on_calibration_data(llm, calibrated, table):
    from sparsekv.ffn.calibrate import achieved

    th = FFNThresholds.load(calibrated, 4)
    for s in (0.4, 0.5):
        got = achieved(llm, default_texts()[0], th, table, s, TOKENS)
        assert len(got) == 16 and all(abs(f - s) <= 0.01 for f in got.values()), got


def test_chess_importance_quantile_within_one_percent(llm, calibrated):
    th = FFNThresholds.load(calibrated, 4)
    model = llm.engine.runner.model
    below = [0, 0]

    def measure(layer, site, x, out):
        if site == "gate_up":
            gate = out.float().chunk(2, dim=-1)[0]
            score = torch.nn.functional.silu(gate).pow(2) * torch.tensor(th.channels["chess.up_ms"][layer])
            below[0] += int((score <= th.threshold("chess", layer, "score", 0.5)).sum())
            below[1] += score.numel()

    from sparsekv.ffn.calibrate import run_texts

    with hooked(model, measure):
        run_texts(llm, default_texts()[0], TOKENS)
    assert abs(below[0] / below[1] - 0.5) <= 0.01


@pytest.mark.parametrize("method,extra", [("teal", {}), ("wina", {}), ("wina", {"mask_by": "threshold"}),
                                          ("chess", {}), ("chess", {"mode": "cats"})])
def test_sparsity_zero_is_dense_exactly_and_sparse_differs(llm, method, extra):
    dense = _logits(llm, None)
    assert torch.equal(_logits(llm, _ffn(method, 0.0, prefill_sparsify_fraction=1.0, **extra)), dense)
    sparse = _logits(llm, _ffn(method, 0.5, **extra))
    assert torch.equal(sparse[0], dense[0])  # the prompt's prefill stays dense by default
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse[1:], dense[1:])


@pytest.mark.parametrize("method,extra", [("teal", {}), ("wina", {}), ("chess", {}), ("chess", {"mode": "cats"})])
def test_decode_kernel_equals_masked_prefill(llm, method, extra):
    """Decode rows (kernel reading active weight rows) match the same rows in a prefill that
    applies the same masks to the dense GEMM."""
    sp = _ffn(method, 0.5, prefill_sparsify_fraction=1.0, **extra)
    decoded = _logits(llm, sp)
    for n in (2, len(FORCED)):
        prefilled = _logits(llm, sp, PROMPT + FORCED[:n], [])
        torch.testing.assert_close(prefilled[0], decoded[n], rtol=1e-4, atol=1e-4)


def test_batch_of_two_equals_two_batches_of_one(llm):
    sp = _ffn("teal", 0.5)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [PROMPT, list(range(100, 130))]
    both = [o.outputs[0].token_ids for o in llm.generate(prompts, params, sparsity=sp, use_tqdm=False)]
    alone = [llm.generate([p], params, sparsity=sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert both == alone


def test_requests_with_different_ffn_configs_share_a_step(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    configs = [None, _ffn("teal", 0.5), _ffn("chess", 0.4)]
    alone = [llm.generate([PROMPT], params, sparsity=c, use_tqdm=False)[0].outputs[0].token_ids for c in configs]
    engine = llm.engine
    done = run_together(engine, {f"mix{i}": (PROMPT, c) for i, c in enumerate(configs)}, params)
    assert [done[f"mix{i}"].token_ids for i in range(3)] == alone


def test_chess_leaves_k_and_v_dense():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 40)
    x = torch.randn(3, 16)
    rule = Rule(torch.full((16,), 0.8), out_rows=(0, 24))
    for rows in (None, torch.tensor([True, False, True])):
        y = sparse_linear(x, rule, lin, rows)
        assert torch.equal(y[:, 24:], torch.nn.functional.linear(x, lin.weight[24:], lin.bias[24:]))
        masked = x * ((x.abs() > 0.8) | (~rows[:, None] if rows is not None else False))
        torch.testing.assert_close(y[:, :24], torch.nn.functional.linear(masked, lin.weight[:24], lin.bias[:24]))


def test_wina_topk_keeps_exactly_k_and_equal_norms_give_magnitude_topk():
    x = torch.randn(5, 32)
    keep = keep_mask(x, Rule(torch.zeros(32), torch.rand(32) + 0.1, topk=12))
    assert keep.sum(1).tolist() == [12] * 5
    flat = keep_mask(x, Rule(torch.zeros(32), torch.full((32,), 3.0), topk=12))
    assert torch.equal(flat, keep_mask(x, Rule(torch.zeros(32), None, topk=12)))


def test_prefill_policy_sparsifies_the_last_fraction_of_each_prompt():
    # a 10-token prompt in a chunk of 4 (positions 6..9) and a whole 4-token prompt
    reqs = [RequestInput(4, 10, [0], "prefill", 0, 10), RequestInput(4, 4, [1], "prefill", 1, 4)]
    meta = AttnMetadata.build(reqs, 16, torch.device("cpu"))
    rows = prefill_rows(meta.group("prefill", 0, 2), 0.5, torch.device("cpu"))
    assert rows.tolist() == [True] * 4 + [False, False, True, True]


def test_thresholds_round_trip(calibrated, tmp_path):
    th = FFNThresholds.load(calibrated, 4)
    th.save(tmp_path / "copy.json")
    back = FFNThresholds.load(tmp_path / "copy.json", 4)
    assert back.tables == th.tables and back.channels == th.channels and back.levels == th.levels
    assert back.threshold("teal", 2, "down", 0.45) == th.threshold("teal", 2, "down", 0.45) > 0


def _broken(calibrated, tmp_path, edit) -> str:
    data = json.loads(open(calibrated).read())
    text = edit(data)
    path = tmp_path / "bad.json"
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("edit,match", [
    (lambda d: "{not json", "cannot be read as JSON"),
    (lambda d: d.update(format="other"), "not a sparsekv-ffn-thresholds file"),
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d.update(num_layers=7), "calibrated for 7 layers"),
    (lambda d: d["tables"]["teal"][1]["down"].reverse(), "layer 1 site 'down'"),
    (lambda d: d["tables"]["teal"][0].update(qkv=[1.0, 2.0]), "layer 0 site 'qkv'"),
])
def test_bad_thresholds_file_is_a_clear_error(calibrated, tmp_path, edit, match):
    path = _broken(calibrated, tmp_path, edit)
    with pytest.raises(ThresholdsError, match=match) as err:
        FFNThresholds.load(path, 4)
    assert path in str(err.value)


def test_engine_refuses_bad_or_missing_thresholds(tiny_llama4, calibrated, tmp_path, llm):
    bad = _broken(calibrated, tmp_path, lambda d: d.update(num_layers=3))
    with pytest.raises(ValueError, match="calibrated for 3 layers"):
        LLM(tiny_llama4, dtype="float32", device="cpu", ffn_thresholds=bad)
    with pytest.raises(ValueError, match="needs calibrated thresholds"):
        LLM(tiny_llama4, dtype="float32", device="cpu", sparsity=_ffn("teal", 0.5))
    partial = _broken(calibrated, tmp_path, lambda d: d["tables"].pop("chess"))
    no_chess = LLM(tiny_llama4, dtype="float32", device="cpu", ffn_thresholds=partial, sparsity=_ffn("teal", 0.5))
    with pytest.raises(ValueError, match="'chess' table"):
        no_chess.engine.add_request("x", PROMPT, SamplingParams(max_tokens=2), _ffn("chess", 0.5))
    no_chess.engine.add_request("y", PROMPT, SamplingParams(max_tokens=2), _ffn("wina", 0.5))  # top-k: no table


def test_thresholds_next_to_the_model_are_found(tiny_llama4, calibrated):
    import shutil
    from pathlib import Path

    target = Path(tiny_llama4) / "ffn_thresholds.json"
    shutil.copy(calibrated, target)
    try:
        llm = LLM(tiny_llama4, dtype="float32", device="cpu", sparsity=_ffn("teal", 0.4))
        assert llm.engine.runner.ffn.thresholds.num_layers == 4
    finally:
        target.unlink()


def test_teal_greedy_allocation(tiny_llama4, tmp_path, llm):
    out = tmp_path / "greedy.json"
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    args = parser.parse_args(["--model", tiny_llama4, "--method", "teal", "--greedy", "--samples", "3",
                              "--output", str(out), "--sample-tokens", "32"])
    assert calibrate.run(args) == 0
    th = FFNThresholds.load(out, 4)
    sizes = {s: lin.weight.numel() for s, lin in llm.engine.runner.ffn.linears(0).items()}
    for layer in th.tables["teal_greedy"]:  # non-decreasing per site (checked on load); effective near the level
        for j, level in enumerate(th.levels):
            if level <= 0.9:
                eff = sum(sizes[s] * layer[s][j] for s in sizes) / sum(sizes.values())
                assert abs(eff - level) <= 0.05 / 2 + 1e-6
    greedy = LLM(tiny_llama4, dtype="float32", device="cpu", ffn_thresholds=str(out))
    uniform, chosen = (_logits(greedy, _ffn("teal", 0.5, allocation=a)) for a in ("uniform", "greedy"))
    assert torch.isfinite(chosen).all() and not torch.equal(uniform, chosen)
