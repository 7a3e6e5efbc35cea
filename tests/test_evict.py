"""Token eviction in the engine: full budget equals dense exactly, budgets, sinks and recent
tokens hold per layer and KV head, pages go back to the pool, prefix-cached pages of other
requests are never touched, and chunking and preemption do not change the output."""
from __future__ import annotations

import pytest
import torch

from engine_steps import run_together

from sparsekv import LLM, SamplingParams
from sparsekv.config import SparsityConfig

METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
PROMPT = "the sky is blue and the grass is green and the sun is light and the moon is dark " * 6
OTHER = "remember the pass key 71432 " * 12
BUDGET = 64


def evict(method: str, budget: int = BUDGET, **params) -> dict:
    return {"kv": {"evict": method, "budget": budget, "evict_params": params}}


def run(llm: LLM, prompts: list[str], sparsity=None):
    return [o.outputs[0] for o in llm.generate(prompts, GREEDY, sparsity=sparsity, use_tqdm=False)]


def close_logprobs(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    return all(x.keys() == y.keys() and all(abs(x[t] - y[t]) < tol for t in x) for x, y in zip(a, b))


def steps(llm: LLM, requests: dict[str, tuple[str, dict | None]], each=lambda engine: None):
    """Run requests to the end through engine.step(), calling each(engine) after every step."""
    return run_together(llm.engine, requests, GREEDY, each)


@pytest.fixture(scope="module")
def llm(tiny_llama4):
    return LLM(tiny_llama4, max_model_len=512, max_num_seqs=8, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def dense(llm):
    return run(llm, [PROMPT, OTHER])


@pytest.mark.parametrize("method", METHODS)
def test_full_budget_equals_dense_exactly(llm, dense, method):
    outs = run(llm, [PROMPT, OTHER], evict(method, 4096))
    assert [(o.token_ids, o.logprobs) for o in outs] == [(o.token_ids, o.logprobs) for o in dense]


@pytest.mark.parametrize("method", METHODS)
def test_budget_sinks_and_recent_per_layer_and_head(llm, dense, method):
    """After the prompt and at every decode step: each (layer, KV head) row keeps exactly its
    own budget (one-shot methods grow by the tokens generated since), its live slots are the
    last ones and hold distinct positions, sinks and the recent window are in every row; the
    sequence holds just the pages its longest row needs."""
    budget = 40  # PyramidKV's first layer keeps about twice this: still below the prompt
    sp = SparsityConfig.model_validate(evict(method, budget, n_sink=2) if method != "streamingllm" else evict(method, budget))
    p = sp.kv.eviction()
    cap = p.capacity(budget, 0)
    seen = []

    def check(engine):
        for seq in engine.scheduler.running:
            kv_len = seq.num_computed_tokens - seq.num_evicted_tokens
            st = engine.runner.evictor.states[seq.slot]
            generated = seq.num_computed_tokens - seq.num_prompt_tokens
            starts = torch.zeros_like(st.pos[..., 0]) if st.starts is None else st.starts
            if st.budgets is not None:  # evicted
                rows = kv_len - starts
                assert torch.equal(rows, st.budgets + generated) if p.one_shot else (rows <= cap).all()
                assert int(rows.max()) == kv_len  # the longest row sets the sequence's slots
                per_layer = st.budgets.sum(1) if method == "adakv" else st.budgets[:, 0]
                want = cap * (2 if method == "adakv" else 1)
                assert (per_layer == want).all() if method != "pyramidkv" else int(per_layer.sum()) == 4 * cap
                if method in ("pyramidkv", "adakv"):
                    assert (rows != rows.max()).any()  # rows really differ
                    frac = 1 - (seq.num_evicted_tokens + float(starts.double().mean())) / seq.num_computed_tokens
                    assert abs(frac - float(rows.double().mean()) / seq.num_computed_tokens) < 1e-9
            for i in range(st.pos.shape[0]):
                for h in range(st.pos.shape[1]):
                    live, dead = st.pos[i, h, int(starts[i, h]):kv_len], st.pos[i, h, :int(starts[i, h])]
                    assert (live >= 0).all() and len(live.unique()) == len(live) and (dead == -1).all()
            pos = st.pos[..., :kv_len]
            for must in [*range(p.n_sink), *range(seq.num_computed_tokens - p.protected_recent(cap), seq.num_computed_tokens)]:
                assert bool((pos == must).any(-1).all()), must
            assert -(-kv_len // 16) <= len(seq.block_table) <= kv_len // 16 + 1
            seen.append(seq.num_evicted_tokens)

    got = steps(llm, {"a": (PROMPT, sp.model_dump())}, check)
    assert max(seen) > 0 and got["a"].token_ids != [] and len(got["a"].token_ids) == GREEDY.max_tokens


def test_pages_return_to_the_pool(llm):
    """With eviction the sequence holds fewer pages than dense at the same point, and the
    reported KV fraction is the kept one; everything is free at the end."""
    bm = llm.engine.block_manager
    free = {}
    for name, sp in (("dense", None), ("snapkv", evict("snapkv"))):
        lows = []
        out = steps(llm, {name: (PROMPT, sp)}, lambda engine: lows.append(bm.num_free_blocks))
        free[name] = min(lows)
        assert bm.num_free_blocks == len(bm.blocks)
        frac = llm.engine.requests.get(name)
    outs = llm.generate([PROMPT], GREEDY, sparsity=evict("snapkv"), use_tqdm=False)
    assert free["snapkv"] > free["dense"]
    prompt_len = len(outs[0].prompt_token_ids)
    assert outs[0].sparsity.kv_bytes_fraction == pytest.approx((BUDGET + GREEDY.max_tokens - 1) / (prompt_len + GREEDY.max_tokens - 1))


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])  # uniform rows, per-row lengths
@pytest.mark.parametrize("cow", [True, False])
def test_shared_prefix_is_never_mutated(tiny_llama4, cow, method):
    """A dense request shares its cached prompt pages with a second, longer one: the dense output
    is the same whether the second evicts or not, and so is a later request's that hits the
    cache after the eviction. The evicting one copies the shared pages it writes, so it gets
    what it gets with nobody sharing (up to the rounding of other batch shapes); with no pages
    to spare for copies (cow False) it keeps the shared pages in place."""
    llm = LLM(tiny_llama4, max_model_len=512, max_num_seqs=8)
    bm = llm.engine.block_manager
    if not cow:
        bm.make_private = lambda seq, pages: None
    got, later = {}, {}
    for other in (None, evict(method, 40, window=8)):
        bm.cached.clear()
        llm.engine.add_request("dense", PROMPT, GREEDY, None)
        llm.engine.step()  # the dense prompt is computed and its pages cached
        hits = bm.prefix_hits
        got[other is None] = steps(llm, {"other": (PROMPT + OTHER, other)})
        assert bm.prefix_hits > hits  # the second request took the dense one's pages
        later[other is None] = run(llm, [PROMPT])[0]  # hits the dense pages only
    assert got[False]["other"].logprobs != got[True]["other"].logprobs  # it did evict
    assert got[False]["dense"].logprobs == got[True]["dense"].logprobs
    assert later[False].logprobs == later[True].logprobs
    if not cow:
        return
    bm.cached.clear()
    run(llm, [PROMPT])  # the dense prompt's pages cached, nobody holding them
    unshared = run(llm, [PROMPT + OTHER], evict(method, 40, window=8))[0]
    assert close_logprobs(got[False]["other"].logprobs, unshared.logprobs)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "h2o", "streamingllm"])
def test_cached_prompt_gives_what_an_uncached_one_gives(llm, tiny_llama4, method):
    """The same prompt already cached by a dense request: the scored queries (SnapKV's window,
    H2O's whole prompt) are still computed, so eviction keeps what it keeps without the cache."""
    cached = LLM(tiny_llama4, max_model_len=512, max_num_seqs=8)
    run(cached, [PROMPT])
    hits = cached.engine.block_manager.prefix_hits
    got = run(cached, [PROMPT], evict(method))[0]
    if method != "h2o":
        assert cached.engine.block_manager.prefix_hits > hits
    want = run(llm, [PROMPT], evict(method))[0]
    assert got.token_ids == want.token_ids and close_logprobs(got.logprobs, want.logprobs)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_chunked_prefill_equals_unchunked(llm, tiny_llama4, method):
    chunked = LLM(tiny_llama4, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=24,
                  enable_prefix_caching=False)
    got, want = run(chunked, [PROMPT], evict(method))[0], run(llm, [PROMPT], evict(method))[0]
    assert got.token_ids == want.token_ids and close_logprobs(got.logprobs, want.logprobs)


def test_preemption_equals_alone(tiny_llama4):
    """A pool so small that evicting sequences are preempted: each still gets what it gets alone
    (distinct prompts: a live sharer of a prompt's pages changes what can be evicted)."""
    from sparsekv.cache.kv_cache import KVCache
    configs = [None, evict("snapkv"), evict("streamingllm"), evict("h2o")]
    prompts = [OTHER, "one two three four five six seven eight nine zero " * 10, PROMPT,
               "cat dog tree river stone light " * 14]
    alone = LLM(tiny_llama4, max_model_len=160, max_num_seqs=1)
    expected = [run(alone, [p], c)[0] for p, c in zip(prompts, configs)]
    per_page = KVCache.bytes_per_page(4, 16, 2, 16, torch.float32)
    # 14 pages: each prompt fits when admitted (the scheduler admits none that does not) and the
    # running ones' growth then forces a preemption (at 10-13 pages admission avoids them all)
    busy = LLM(tiny_llama4, max_model_len=160, max_num_seqs=4, max_num_batched_tokens=40,
               kv_cache_memory=14 * per_page)
    got = steps(busy, {str(i): (p, c) for i, (p, c) in enumerate(zip(prompts, configs))})
    assert busy.engine.scheduler.num_preemptions > 0
    for i, want in enumerate(expected):  # equal up to the float rounding of other batch shapes
        assert got[str(i)].token_ids == want.token_ids
        assert close_logprobs(got[str(i)].logprobs, want.logprobs)
    bm = busy.engine.block_manager
    assert bm.num_free_blocks == len(bm.blocks)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_preempted_after_evicting_replays_exactly(llm, method):
    """Preempted mid-decode, after it evicted: the recompute replays the prompt, then one token a
    step, and ends exactly where the uninterrupted run does."""
    want = run(llm, [PROMPT], evict(method))[0]
    sched = llm.engine.scheduler
    preempted = []

    def preempt_once(engine):
        seq = engine.requests["r"][0] if "r" in engine.requests else None
        if seq and not preempted and seq.num_evicted_tokens and len(seq.output_token_ids) == 5:
            sched.running.remove(seq)
            sched._preempt(seq)
            preempted.append(seq.num_computed_tokens)
    got = steps(llm, {"r": (PROMPT, evict(method))}, preempt_once)["r"]
    assert preempted and got.token_ids == want.token_ids and got.logprobs == want.logprobs


def test_composes_with_sparse_prefill_and_decode(llm):
    """XAttention prefill + SnapKV + Quest decode in one request; at full budgets it is dense."""
    full = {"prefill": {"method": "xattention", "threshold": 1.0, "block_size": 16, "stride": 4},
            "decode": {"method": "quest", "budget": 4096}}
    small = {"prefill": {"method": "xattention", "threshold": 0.5, "block_size": 16, "stride": 4},
             "decode": {"method": "quest", "budget": 48}}
    base = run(llm, [PROMPT], full)[0]
    assert run(llm, [PROMPT], {**full, **evict("snapkv", 4096)})[0].logprobs == base.logprobs
    out = llm.generate([PROMPT], GREEDY, sparsity={**small, **evict("snapkv")}, use_tqdm=False)[0]
    assert out.sparsity.kv_bytes_fraction < 1 and len(out.outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("bad", [
    {"evict": "lru"},
    {"evict": "snapkv", "budget": 16},  # below the 32-token observation window
    {"evict": "streamingllm", "budget": 4},  # no room past the 4 sinks
    {"evict": "snapkv", "evict_params": {"pool": "median"}},
    {"evict": "snapkv", "evict_params": {"pool_kernel": 4}},
    {"evict": "pyramidkv", "evict_params": {"beta": 0.5}},
    {"evict": "adakv", "evict_params": {"floor_alpha": 2}},
    {"evict": "h2o", "evict_params": {"heavy_ratio": 0}},
    {"evict": "h2o", "evict_params": {"nope": 1}},
    {"evict_params": {"window": 8}},
    {"evict": "snapkv", "budget": 0},
])
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SparsityConfig.model_validate({"kv": bad})


def test_request_override_switches_method_defaults():
    base = SparsityConfig.model_validate(evict("pyramidkv", 256, beta=10))
    assert base.merged({"kv": {"evict": "snapkv"}}).kv.eviction().window == 32
