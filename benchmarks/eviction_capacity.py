"""Token eviction's payoff: more sequences at once at a fixed KV memory, and cheaper decode steps.

Capacity: --num-prompts random prompts of --input-len tokens, --output-len tokens each, through
the engine's real step loop with --kv-cache-memory bytes of KV pool and up to --max-concurrency
sequences: the most and the mean sequences running per step, output tok/s, preemptions, the
kept KV fraction; dense vs each method at --budget. (The same through the server:
`sparsekv bench serve --kv-cache-memory 1073741824 --max-concurrency 32 --input-len 8192
--output-len 128 --kv-evict snapkv --kv-budget 1024 --output DIR`.)
Decode: seconds per decode step at each of --contexts and --decode-budgets for a --decode-batch
of sequences whose KV is filled with random values as if prefilled, through the engine's real
step with each method's config: dense reads the whole context; H2O and StreamingLLM hold the
budget and evict one token per row every step (scores included); the one-shot methods (SnapKV,
PyramidKV, AdaKV) start as just after their eviction (their per-row budgets from the method's
own rule, AdaKV's from random scores), so each (layer, KV head) row reads its own kept length.
kv_read_tokens is the mean row length read per step, kv_tokens the slots (pages) held.
Writes results/<name>.json after every finished row (a time cap loses nothing finished) and
the .png at the end (`--plot-only` redraws it from the JSON).

    python benchmarks/eviction_capacity.py                          # the issue's sizes
    python benchmarks/eviction_capacity.py --input-len 256 --output-len 8 --num-prompts 6 \\
        --budget 64 --kv-cache-memory 8000000 --contexts 512 --decode-budgets 64 --name eviction-tiny
    python benchmarks/eviction_capacity.py --skip-capacity --contexts 16384,32768,65536 \\
        --decode-budgets 1024,2048 --name eviction-decode          # decode step time only
    python benchmarks/eviction_capacity.py --methods dense,dense+mustafar,snapkv,snapkv+mustafar \\
        --contexts ""                                              # eviction over Mustafar's cache
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from sparsekv.config import SparsityConfig

RESULTS = Path(__file__).parent / "results"
METHODS = "dense,streamingllm,h2o,snapkv,pyramidkv,adakv"


def sparsity(method: str, budget: int) -> dict:
    """A row's method: dense or an eviction method, either with "+mustafar" for Mustafar's
    compressed cache under it (capacity rows only)."""
    base, _, prune = method.partition("+")
    kv = ({} if base == "dense" else {"evict": base, "budget": budget}) | ({"prune": prune} if prune else {})
    return {"kv": kv} if kv else {}


def engine_for(args, method: str, budget: int, max_len: int, kv_bytes: int, max_seqs: int):
    from sparsekv.config import EngineConfig, SparsityConfig
    from sparsekv.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, max_model_len=max_len, max_num_seqs=max_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=kv_bytes,
                                  enable_prefix_caching=False,
                                  sparsity=SparsityConfig.model_validate(sparsity(method, budget))))


def capacity(args, method: str) -> dict:
    from sparsekv.engine.sampling_params import SamplingParams
    engine = engine_for(args, method, args.budget, args.input_len + args.output_len + 16, args.kv_cache_memory,
                        args.max_concurrency)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        engine.add_request(str(i), torch.randint(100, 1000, (args.input_len,), generator=g).tolist(), params)
    running, fractions, out_tokens = [], [], 0
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        running.append(len(engine.scheduler.running))
        for o in outs:
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
                fractions.append(o.sparsity.kv_bytes_fraction)
    wall = time.perf_counter() - t
    row = {"method": method, "peak_running": max(running), "mean_running": statistics.mean(running),
           "output_tok_s": out_tokens / wall, "wall_s": wall, "preemptions": engine.scheduler.num_preemptions,
           "kv_bytes_fraction": statistics.mean(fractions), "pool_pages": engine.runner.num_pages}
    del engine
    gc.collect()
    return row


def one_shot_rows(params, budget: int, context: int, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """int64 [L, Hkv]: the tokens each row keeps right after a one-shot eviction, by the method's
    own budget rule (scores random: they shape only AdaKV's split across heads)."""
    scores = torch.rand(*shape, context, generator=g)
    free = torch.ones_like(scores, dtype=torch.bool)
    free[..., :params.n_sink] = False
    free[..., context - params.window:] = False
    protected = params.n_sink + params.window
    return params.row_budgets(budget, scores, free, protected).clamp(min=protected, max=context)


def decode_step(args, method: str, context: int, budget: int) -> dict:
    """Seconds per decode step, sequences as if prefilled (see the module docstring)."""
    from sparsekv.cache.kv_cache import KVCache
    from sparsekv.engine.loader import read_config
    from sparsekv.engine.model_runner import DTYPES
    from sparsekv.engine.sampling_params import SamplingParams
    from sparsekv.engine.sequence import Sequence, SequenceStatus
    from sparsekv.evict.evictor import SlotState

    cfg = read_config(args.model)
    shape = (cfg["num_hidden_layers"], cfg["num_key_value_heads"])
    g = torch.Generator().manual_seed(0)
    params = None if method == "dense" else SparsityConfig.model_validate(sparsity(method, budget)).kv.eviction()
    rows = None
    if params is not None and params.one_shot:
        rows = one_shot_rows(params, budget, context, shape, g)
    kept = context if params is None else int(rows.max()) if rows is not None else min(context, budget)
    steps, max_len = args.decode_steps, context + args.decode_steps + 16
    per_page = KVCache.bytes_per_page(shape[0], 16, shape[1],
                                      cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                                      DTYPES.get(args.dtype, torch.float32))
    pages = max(args.decode_batch * ((kept + steps) // 16 + 2), -(-max_len // 16)) + 4
    engine = engine_for(args, method, budget, max_len, pages * per_page, args.decode_batch)
    for kv in engine.runner.kv_cache.layers:
        kv.k.normal_(0, 1)
        kv.v.normal_(0, 1)
    sampling = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    for i in range(args.decode_batch):
        ids = torch.randint(100, 1000, (context,), generator=g).tolist()
        seq = Sequence(str(i), 0, ids, sampling, engine.config.sparsity)
        assert engine.block_manager.allocate(seq, kept)
        seq.num_computed_tokens, seq.num_evicted_tokens = context, context - kept
        seq.token_ids.append(ids[-1])
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[str(i)] = [seq]
        if rows is not None:  # the state a one-shot eviction leaves: done, rows right-aligned below kept
            slot = engine.runner.slot(seq)
            engine.runner.evictor.states[slot] = SlotState(
                torch.zeros(*shape, kept, dtype=torch.long), torch.zeros(*shape, kept), [[] for _ in range(shape[0])],
                budgets=rows, starts=None if bool((rows == kept).all()) else kept - rows, known=kept, done=True)
    engine.step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step = (time.perf_counter() - t) / steps
    del engine
    gc.collect()
    read = context if params is None else float(rows.double().mean()) if rows is not None else kept
    return {"method": method, "context": context, "budget": None if params is None else budget, "kv_tokens": kept,
            "kv_read_tokens": read, "batch": args.decode_batch, "step_s": step}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cap = result["capacity"]
    if cap:
        names = [r["method"] for r in cap]
        axes[0].bar(names, [r["peak_running"] for r in cap], label="peak")
        axes[0].bar(names, [r["mean_running"] for r in cap], alpha=0.6, label="mean")
        axes[0].set_title("sequences running at once")
        axes[0].legend()
        axes[1].bar(names, [r["output_tok_s"] for r in cap])
        axes[1].set_title("output tok/s")
        for ax in axes[:2]:
            ax.tick_params(axis="x", rotation=30)
    for method, budget in dict.fromkeys((r["method"], r.get("budget")) for r in result["decode"]):
        rows = [r for r in result["decode"] if (r["method"], r.get("budget")) == (method, budget)]
        axes[2].plot([r["context"] for r in rows], [r["step_s"] * 1e3 for r in rows], marker="o",
                     label=method if budget is None else f"{method} {budget}")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("context")
    axes[2].set_ylabel("ms / decode step")
    axes[2].legend()
    axes[2].set_title(f"decode step, batch {result['args']['decode_batch']}")
    fig.suptitle(f"eviction at budget {result['args']['budget']} (capacity)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--kv-cache-memory", type=int, default=2**30)
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--contexts", default="16384,32768,65536")
    p.add_argument("--decode-budgets", default="1024,2048", help="budgets of the decode step rows")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--name", default="eviction")
    p.add_argument("--plot-only", action="store_true", help="redraw the .png from results/<name>.json")
    args = p.parse_args()
    path = RESULTS / f"{args.name}.json"
    if args.plot_only:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    if args.model is None:
        from sparsekv.config import default_model
        args.model = default_model()
    methods = args.methods.split(",")
    from sparsekv.bench.bandwidth import cpu_description

    result = {**cpu_description(), "args": vars(args), "capacity": [], "decode": []}
    RESULTS.mkdir(exist_ok=True)

    def add(part: str, row: dict) -> None:
        result[part].append(row)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)

    if not args.skip_capacity:
        for m in methods:
            add("capacity", capacity(args, m))
    budgets = [int(x) for x in args.decode_budgets.split(",") if x]
    for c in (int(x) for x in args.contexts.split(",") if x):
        for m in methods:
            for b in budgets[:1] if m == "dense" else budgets:
                add("decode", decode_step(args, m, c, b))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
