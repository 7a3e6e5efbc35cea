"""DELTA decode: Δ-layer selection, cross-layer routing, dense fallbacks, and calibration."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from decode_cases import attended, backend, dense_out, keys, make_case, plant_heavy_key

from sparsekv import calibrate
from sparsekv.attention.delta import DeltaParams, default_delta_layers, page_mass
from sparsekv.attention.page_select import attend_pages
from sparsekv.config import SparsityConfig

LAYERS = (2, 5)


def run_layers(be, case, layers, plan=None, only=None):
    """Drive forward layer by layer like the model does within one step (one plan)."""
    plan = plan or case.plan(be, only)
    outs, pairs = {}, {}
    for layer in layers:
        before = attended(plan)
        outs[layer], _ = case.run(be, layer, plan, only)
        pairs[layer] = [a - b for a, b in zip(attended(plan), before)]
    return outs, pairs, plan


def selection(plan, i):
    """The pages the step's Δ-layer chose for request i (None: within the budget)."""
    if plan.selection is None or i not in plan.active:
        return None
    return plan.selection[1][plan.active.index(i)]


def reference_selection(case, seq, budget_pages, recent, per_group):
    """Brute force: token score = max softmax probability over heads, summed per page."""
    k = keys(case, seq)
    hkv, g = k.shape[0], case.q.shape[1] // k.shape[0]
    probs = torch.stack([torch.softmax(case.q[seq, h * g:(h + 1) * g] @ k[h].T * case.scale, -1)
                         for h in range(hkv)])
    tok = probs.amax(1) if per_group else probs.amax((0, 1)).unsqueeze(0)
    n = -(-case.lens[seq] // 16)
    picked = []
    for row in tok:
        score = [float(row[p * 16:(p + 1) * 16].sum()) - 1e-7 * p for p in range(n)]
        chosen = set(range(n - recent, n))
        for p in sorted(range(n - recent), key=lambda p: -score[p]):
            if len(chosen) < budget_pages:
                chosen.add(p)
        picked.append(sorted(chosen))
    return torch.tensor(picked)


def test_default_layers():
    assert default_delta_layers(32) == (2, 10, 18, 26)
    assert default_delta_layers(4) == (2,) and default_delta_layers(2) == ()
    with pytest.raises(ValueError, match="recent_pages"):
        DeltaParams(budget=128, recent_pages=8)


@pytest.mark.parametrize("d", [16, 32])  # 32: a head dim the compiled CPU kernels take
def test_full_budget_is_dense_bit_for_bit_at_every_layer(d):
    case = make_case([37, 300, 700], d=d)
    outs, attended, _ = run_layers(backend("delta", delta_layers=LAYERS), case, range(2, 8))
    dense = dense_out(case)
    for layer in range(2, 8):
        assert torch.equal(outs[layer], dense)
        assert attended[layer] == [n * 4 for n in case.lens]


@pytest.mark.parametrize("d", [16, 32])  # 32: the compiled decode and page-mass ops
@pytest.mark.parametrize("per_group", [False, True])
def test_selection_matches_reference(per_group, d):
    case = make_case([700, 1000, 60], d=d, seed=1)
    be = backend("delta", delta_layers=LAYERS, budget=128, recent_pages=2,
                 head_reduce="group" if per_group else "all")
    outs, _, plan = run_layers(be, case, [2])
    assert torch.equal(outs[2], dense_out(case))  # the Δ-layer itself is dense
    assert selection(plan, 2) is None  # 60 tokens: within the budget
    assert plan.selection[0] == 2
    for i in (0, 1):
        assert torch.equal(selection(plan, i), reference_selection(case, i, 8, 2, per_group))


def test_sparse_layers_use_latest_delta_layer():
    case = make_case([700, 1000, 60], seed=2)
    be = backend("delta", delta_layers=(3, 5), budget=128, recent_pages=2)
    plan = case.plan(be)
    dense = dense_out(case)
    for layer in range(2, 8):
        before = attended(plan)
        out, _ = case.run(be, layer, plan)
        if layer in (2, 3, 5):  # below the first Δ-layer, and the Δ-layers: dense
            assert torch.equal(out, dense)
            if layer in (3, 5):
                chosen = [selection(plan, i) for i in (0, 1)]
            continue
        torch.testing.assert_close(out[2], dense[2], rtol=1e-6, atol=1e-6)  # within the budget
        ref, pairs = attend_pages(case.q[:2], case.kv, case.tables[:2], torch.tensor(case.lens[:2]),
                                     torch.stack([c.expand(2, -1) for c in chosen]), case.scale)
        torch.testing.assert_close(out[:2], ref, rtol=0, atol=0)
        assert [a - b for a, b in zip(attended(plan), before)][:2] == pairs.tolist()
        assert all(a <= 128 * 4 for a in pairs.tolist())


@pytest.mark.parametrize("pos", [0, 9, 250, 480, 690])
def test_heavy_key_page_is_selected(pos):
    case = make_case([700], seed=pos)
    plant_heavy_key(case, 0, pos, head=0)
    _, _, plan = run_layers(backend("delta", delta_layers=LAYERS, budget=64, recent_pages=1), case, [2])
    assert pos // 16 in selection(plan, 0)[0].tolist()


def test_selection_lives_one_step_only():
    """A selection belongs to the step's plan: the next step (a new plan) starts dense again."""
    case = make_case([700, 400], seed=3)
    be = backend("delta", delta_layers=LAYERS, budget=128, recent_pages=2)
    _, _, plan = run_layers(be, case, [2])
    assert plan.selection is not None
    outs, pairs, _ = run_layers(be, case, [3])  # a fresh plan: no Δ-layer has run in it
    assert torch.equal(outs[3], dense_out(case))
    assert pairs[3] == [n * 4 for n in case.lens]


def test_batched_groups_equal_one_by_one():
    """Two request groups with their own params, lengths below and above the budget."""
    case = make_case([100, 600, 1500, 40, 333, 900], seed=4)
    groups = {(0, 1, 2): backend("delta", delta_layers=LAYERS, budget=128, recent_pages=2),
              (3, 4, 5): backend("delta", delta_layers=(2, 4), budget=256, page_size=32, recent_pages=3,
                                     head_reduce="group")}
    for members, be in groups.items():
        members = list(members)
        together, _, _ = run_layers(be, case, range(2, 7), only=members)
        for j, i in enumerate(members):
            alone, _, _ = run_layers(be, case, range(2, 7), only=[i])
            for layer in range(2, 7):
                torch.testing.assert_close(alone[layer][0], together[layer][j], rtol=1e-6, atol=1e-6)


def test_coarser_selection_pages():
    case = make_case([900], seed=5)
    be = backend("delta", delta_layers=LAYERS, budget=128, page_size=32, recent_pages=1)
    _, _, plan = run_layers(be, case, [2])
    pages = selection(plan, 0)
    assert pages.shape == (1, 8) and pages[0, -2:].tolist() == [56, -1]  # 57 pool pages
    with pytest.raises(ValueError, match="multiple"):
        run_layers(backend("delta", delta_layers=LAYERS, budget=120, page_size=24, recent_pages=1), case, [2])


def _calibrate(tmp_path, model_dir, *extra):
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--output", str(tmp_path / "delta.json"), *extra])
    return calibrate.run(args)


def test_calibrate_delta(tmp_path):
    from tiny_model import build_model

    model = build_model(tmp_path / "m", "llama", layers=6, hidden=64)
    assert _calibrate(tmp_path, model, "--method", "delta", "--samples", "2", "--sample-tokens", "48",
                      "--num-delta-layers", "2") == 0
    cfg = SparsityConfig.from_file(tmp_path / "delta.json")
    layers = cfg.decode.params("decode").delta_layers
    assert len(layers) == 2 and not set(layers) & {0, 1} and layers[1] - layers[0] > 1
    curve = json.loads((tmp_path / "delta.shift.json").read_text())
    assert len(curve["shift"]) == 6 and curve["delta_layers"] == list(layers)
    assert all(s >= 0 for s in curve["shift"])


def test_calibrate_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        _calibrate(tmp_path, tmp_path, "--method", "bogus")


@pytest.mark.parametrize("per_group", [False, True])
def test_compiled_page_mass_equals_pytorch(per_group):
    """The compiled page-mass op against delta.page_mass over the softmax of the same keys."""
    from sparsekv.attention.kernels import cpu_decode

    if not cpu_decode.available():
        pytest.skip("no compiler for the CPU kernels here")
    case = make_case([700, 45, 1000], d=32, seed=3)
    g = case.plan(backend("dense")).group
    _, lse = cpu_decode.paged_decode_cpu(case.q, case.kv.k, case.kv.v, g.block_table, g.seq_lens, case.scale,
                                         return_lse=True)
    mass = cpu_decode.delta_page_mass_cpu(case.q, case.kv.k, g.block_table, g.seq_lens, lse, case.scale, per_group)
    for i, n in enumerate(case.lens):
        k = keys(case, i)
        probs = torch.softmax(case.q[i].view(2, 2, -1) @ k.transpose(1, 2) * case.scale, -1)
        ref = page_mass(probs, 16, "group" if per_group else "all")
        torch.testing.assert_close(mass[i, :, :ref.shape[1]], ref, rtol=1e-5, atol=1e-6)
        assert (mass[i, :, ref.shape[1]:] == 0).all()
