"""Per-row KV lengths: PyramidKV and AdaKV rows keep exactly their own budgets and decode reads
only each row's kept tokens, in the PyTorch path, the compiled CPU kernel and the engine,
against attention over the cache masked by the evictor's own record of each slot's token."""
from __future__ import annotations

import pytest
import torch

from decode_cases import backend, keys, make_case
from test_evict import GREEDY, PROMPT, evict, steps

from sparsekv import LLM
from sparsekv.attention.dense import DenseBackend, dense_decode, dense_decode_torch
from sparsekv.attention.kernels import cpu_decode
from sparsekv.attention.paged import gather_kv

LENS = [300, 40, 177, 16]
ROWS = [torch.tensor([[300, 1, 130]]), torch.tensor([[0, 40, 17]]), None, torch.tensor([[16, 16, 16]])]


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor, scale: float):
    """q [Hq, D], k/v [Hkv, L, D], live bool [Hkv, L]: softmax over the live keys only."""
    hkv, _, d = k.shape
    s = (q.view(hkv, -1, d).float() @ k.float().transpose(1, 2)) * scale
    s = s.masked_fill(~live.unsqueeze(1), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1))  # a row with nothing live gives zeros
    return (p @ v.float()).reshape(-1, d)


def test_pytorch_path_reads_each_rows_last_tokens():
    case = make_case(LENS, hq=6, hkv=3, d=16, seed=5)
    plan = case.plan(backend("dense"), num_layers=1, row_lens=ROWS)
    out = dense_decode_torch(case.q, case.kv, plan.group, case.scale)
    for i, n in enumerate(LENS):
        rows = torch.full((3,), n) if ROWS[i] is None else ROWS[i][0]
        live = torch.arange(n) >= (n - rows).unsqueeze(-1)
        k = keys(case, i)
        v = case.kv.v[case.tables[i][torch.arange(n) // 16], :, torch.arange(n) % 16].transpose(0, 1)
        torch.testing.assert_close(out[i].float(), masked_reference(case.q[i], k, v, live, case.scale),
                                   rtol=1e-5, atol=1e-5)
    full = case.plan(backend("dense"), num_layers=1, row_lens=[torch.tensor([[n] * 3]) for n in LENS])
    assert torch.equal(dense_decode_torch(case.q, case.kv, full.group, case.scale),
                       dense_decode_torch(case.q, case.kv, case.plan(backend("dense")).group, case.scale))
    be = backend("dense")
    plan = case.plan(be, num_layers=1, row_lens=ROWS)
    be.forward(case.q, case.kv, 0, plan)
    want = [2 * (n * 3 if r is None else int(r.sum())) for n, r in zip(LENS, ROWS)]
    assert plan.attended.tolist() == want  # the pairs each request really attended


@pytest.mark.skipif(not cpu_decode.available(), reason="the CPU decode kernel did not build")
def test_cpu_kernel_equals_pytorch_path():
    case = make_case(LENS, hq=6, hkv=3, d=32, seed=6)
    group = case.plan(backend("dense"), num_layers=1, row_lens=ROWS).group
    torch.testing.assert_close(dense_decode(case.q, case.kv, group, case.scale),
                               dense_decode_torch(case.q, case.kv, group, case.scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_decode(case.q, case.kv, group, case.scale, rows=[3, 0]),
                               dense_decode_torch(case.q, case.kv, group, case.scale, rows=[3, 0]),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llm(tiny_llama4):
    return LLM(tiny_llama4, max_model_len=512, max_num_seqs=8, enable_prefix_caching=False)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("method", ["pyramidkv", "adakv"])
def test_engine_decode_equals_masked_reference(llm, method, kernel, monkeypatch):
    """Every decode layer's output (compiled kernel or PyTorch path) equals attention over the
    pool masked to the slots the evictor records as holding a token of that row; the rows keep
    exactly their budgets and the reported KV fraction is the mean kept row over the computed
    tokens."""
    if not kernel:
        monkeypatch.setattr(cpu_decode, "available", lambda: False)
    evictor = llm.engine.runner.evictor
    forward, checked, budgets = DenseBackend.forward, [], {}

    def checking(self, q, kv, layer, plan):
        out = forward(self, q, kv, layer, plan)
        g = plan.group
        if g.phase == "decode" and g.row_lens(layer) is not None:
            for i, (slot, n) in enumerate(zip(g.slots_cpu, g.seq_lens_cpu)):
                k, v = gather_kv(kv, g.block_tables_cpu[i], n)
                live = evictor.states[slot].pos[layer, :, :n] >= 0
                torch.testing.assert_close(out[i].float(), masked_reference(q[i], k, v, live, plan.scale),
                                           rtol=1e-5, atol=1e-5)
                checked.append(bool((~live).any()))
        return out

    def rows_keep_budgets(engine):
        for seq in engine.scheduler.running:
            st = evictor.states[seq.slot]
            if st.budgets is not None:
                kv_len = seq.num_computed_tokens - seq.num_evicted_tokens
                assert torch.equal(kv_len - st.starts, st.budgets + seq.num_computed_tokens - seq.num_prompt_tokens)
                budgets[seq.request_id] = st.budgets.clone()

    monkeypatch.setattr(DenseBackend, "forward", checking)
    steps(llm, {"a": (PROMPT, evict(method, 40, n_sink=2))}, rows_keep_budgets)
    assert any(checked) and budgets["a"].unique().numel() > 1
    out = llm.generate([PROMPT], GREEDY, sparsity=evict(method, 40, n_sink=2), use_tqdm=False)[0]
    prompt, computed = len(out.prompt_token_ids), len(out.prompt_token_ids) + GREEDY.max_tokens - 1
    kept = float(budgets["a"].double().mean()) + computed - prompt
    assert out.sparsity.kv_bytes_fraction == pytest.approx(kept / computed)


def test_backend_without_row_lengths_keeps_the_longest_row(llm):
    """Quest decode reads whole contexts: PyramidKV then keeps its largest budget in every row."""
    starts = []

    def record(engine):
        starts.extend(engine.runner.evictor.states[s.slot].starts for s in engine.scheduler.running
                      if engine.runner.evictor.states[s.slot].budgets is not None)

    sp = {**evict("pyramidkv", 40, n_sink=2), "decode": {"method": "quest", "budget": 4096}}
    steps(llm, {"q": (PROMPT, sp)}, record)
    assert starts and all(s is None for s in starts)
