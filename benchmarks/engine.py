"""Dense engine speed on the default model: sparsekv vs transformers vs the machine's limit.

Decode: the engine's real step loop (scheduler, model runner, attention, sampler) over a KV cache
filled with random values, so a 16K x 16 batch needs no hours of prefill; transformers runs its
forward + greedy pick with a DynamicCache filled the same way (what `generate` does per token).
The limit of a step is the larger of its two roofs: (weight bytes + KV bytes read) / the read
bandwidth, and its FLOPs (2 per weight per row, 4 per head dimension per attended token) / the
throughput of a large matrix product; each measured before and after each row (the higher
reading, so a neighbour's load never makes the limit look easy). `bound` says which roof it is.
Prefill: one real prompt through each. Medians of --repeats; writes results/engine.json + .png.
With --methods each sparse preset's decode step is timed on the same sequences, in turn with dense's.

    python benchmarks/engine.py [--model PATH] [--contexts 4096,16384] [--batches 1,16] [--methods quest,delta]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def sparsekv_engine(model: str, dtype: str, batch: int, context: int, steps: int):
    """An engine with room for batch sequences of context + `steps` tokens and no prefix cache."""
    from sparsekv.cache.kv_cache import KVCache
    from sparsekv.config import EngineConfig
    from sparsekv.engine.llm_engine import LLMEngine

    from sparsekv.engine.loader import read_config
    cfg = read_config(model)
    per_page = KVCache.bytes_per_page(cfg["num_hidden_layers"], 16, cfg["num_key_value_heads"],
                                      cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                                      getattr(torch, dtype))
    pages = batch * (-(-(context + steps + 16) // 16)) + 8
    return LLMEngine(EngineConfig(model=model, dtype=dtype, max_model_len=context + steps + 16,
                                  max_num_seqs=batch, kv_cache_memory=pages * per_page, enable_prefix_caching=False))


def sparsekv_decode(model: str, dtype: str, batch: int, context: int, steps: int, repeats: int,
                    methods: tuple[str, ...] = ("dense",)) -> dict[str, dict]:
    """Seconds per decode step of the engine, batch sequences of `context` cached tokens, per
    sparsity preset: the presets take turns on the same sequences (their configs swapped between
    timed runs), so each repeat times all of them under the same load; `vs_dense` is the median of
    the per-repeat ratios."""
    from sparsekv.config import preset
    from sparsekv.engine.sampling_params import SamplingParams
    from sparsekv.engine.sequence import Sequence, SequenceStatus

    engine = sparsekv_engine(model, dtype, batch, context, steps * (1 + repeats * len(methods)))
    for kv in engine.runner.kv_cache.layers:
        kv.k.normal_(0, 1)
        kv.v.normal_(0, 1)
    configs = {m: engine.config.sparsity if m == "dense" else preset(m) for m in methods}
    for sp in configs.values():
        engine.runner.check_sparsity(sp)  # side tables (Quest's page bounds) made now, from the filled keys
    params = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):  # as if prefilled: pages allocated, all prompt tokens computed
        ids = torch.randint(100, 1000, (context,), generator=g).tolist()
        seq = Sequence(str(i), 0, ids, params, configs[methods[0]])
        assert engine.block_manager.allocate(seq, context)
        seq.num_computed_tokens = context
        seq.token_ids.append(ids[-1])
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[str(i)] = [seq]
        seqs.append(seq)

    def run() -> None:
        for _ in range(steps):
            engine.step()
    run()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            for seq in seqs:
                seq.sparsity = configs[m]
            t = time.perf_counter()
            run()
            times[m].append((time.perf_counter() - t) / steps)
    del engine
    gc.collect()
    base = times[methods[0]]
    return {m: {"step_s": statistics.median(t), "tok_s": batch / statistics.median(t),
                "vs_dense": statistics.median(b / x for b, x in zip(base, t))} for m, t in times.items()}


def transformers_decode(model, batch: int, context: int, steps: int, repeats: int, dtype) -> dict:
    from transformers import DynamicCache

    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def fresh_cache() -> DynamicCache:
        cache = DynamicCache()
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(batch, hkv, context, d, dtype=dtype), torch.randn(batch, hkv, context, d, dtype=dtype),
                         layer)
        return cache

    times = []
    for r in range(repeats + 1):
        cache = fresh_cache()
        tok = torch.randint(100, 1000, (batch, 1))
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(steps):
                pos = torch.full((batch, 1), context + s)
                logits = model(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
        if r:
            times.append((time.perf_counter() - t) / steps)
        del cache
        gc.collect()
    step = statistics.median(times)
    return {"step_s": step, "tok_s": batch / step}


def prefill_rates(model_path: str, hf_model, dtype: str, context: int, repeats: int) -> dict:
    """One prompt through each engine, alternating (after a warm-up of each), medians."""
    from sparsekv import LLM, SamplingParams

    ids = torch.randint(100, 1000, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(model_path, dtype=dtype, max_model_len=context + 8, max_num_seqs=1, max_num_batched_tokens=context,
              enable_prefix_caching=False)

    def ours() -> None:
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)

    def theirs() -> None:
        with torch.inference_mode():
            hf_model(input_ids=torch.tensor([ids]), use_cache=True)
    times: dict = {ours: [], theirs: []}
    for r in range(repeats + 1):
        for fn in (ours, theirs):
            t = time.perf_counter()
            fn()
            if r:
                times[fn].append(time.perf_counter() - t)
    del llm
    gc.collect()
    return {"sparsekv_tok_s": context / statistics.median(times[ours]),
            "transformers_tok_s": context / statistics.median(times[theirs])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["phase"] == "decode"]
    labels = [f"b{r['batch']} {r['context'] // 1024}K" for r in decode]
    x = range(len(decode))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    ax.bar([i - w for i in x], [r["sparsekv_tok_s"] for r in decode], w, label="sparsekv")
    ax.bar(list(x), [r["transformers_tok_s"] for r in decode], w, label="transformers")
    ax.bar([i + w for i in x], [r["limit_tok_s"] for r in decode], w, label="limit (bandwidth or matmul roof)", color="grey")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from sparsekv.bench.bandwidth import cpu_description, matmul_flops, read_bandwidth
    from sparsekv.config import default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the default model)")
    p.add_argument("--hf-model", default=None, help="HF directory for transformers (default: --model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=6, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", default="4096,16384", help="prefill lengths ('' to skip)")
    p.add_argument("--prefill-repeats", type=int, default=2, help="timed prefills of each after a warm-up")
    p.add_argument("--output", default=str(RESULTS / "engine.json"))
    p.add_argument("--only-prefill", action="store_true", help="keep the decode rows of an earlier --output")
    p.add_argument("--methods", default="", help="sparse presets whose decode step is timed beside dense's, e.g. quest,delta")
    args = p.parse_args()
    args.model = args.model or default_model()
    dtype = getattr(torch, args.dtype)
    hf_path = Path(args.hf_model or args.model)  # transformers dequantizes a GGUF to the same weights
    gguf = {"gguf_file": hf_path.name} if hf_path.suffix == ".gguf" else {}
    hf = AutoModelForCausalLM.from_pretrained(str(hf_path.parent if gguf else hf_path), dtype=dtype, **gguf).eval()
    cfg = hf.config
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in hf.parameters()}.values())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    matmul_params = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    attn_flops_per_token = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim  # q.k and p.v
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype.itemsize
    result = {**cpu_description(), "model": args.model, "dtype": args.dtype, "weight_bytes": weight_bytes, "rows": []}
    if args.only_prefill:
        earlier = json.loads(Path(args.output).read_text())
        result = {**earlier, "rows": [r for r in earlier["rows"] if r["phase"] == "decode"]}
        args.batches = ""
    for b in [int(x) for x in args.batches.split(",") if x]:
        for ctx in [int(x) for x in args.contexts.split(",")]:
            bandwidth, flops = read_bandwidth(), matmul_flops(args.dtype)  # beside each row: neighbours move them
            methods = ("dense", *[x for x in args.methods.split(",") if x])
            timed = sparsekv_decode(args.model, args.dtype, b, ctx, args.steps, args.repeats, methods)
            ours = timed["dense"]
            theirs = transformers_decode(hf, b, ctx, args.steps, args.repeats, dtype)
            bandwidth = max(bandwidth, read_bandwidth())  # the better reading: the limit is never overstated
            flops = max(flops, matmul_flops(args.dtype))
            memory_s = (weight_bytes + b * ctx * kv_per_token) / bandwidth
            compute_s = b * (2 * matmul_params + ctx * attn_flops_per_token) / flops
            limit = max(memory_s, compute_s)
            row = {"phase": "decode", "batch": b, "context": ctx, "read_bandwidth_gbs": bandwidth / 1e9,
                   "matmul_gflops": flops / 1e9, "bound": "memory" if memory_s >= compute_s else "compute",
                   "memory_limit_tok_s": b / memory_s, "compute_limit_tok_s": b / compute_s,
                   "sparsekv_tok_s": ours["tok_s"],
                   "transformers_tok_s": theirs["tok_s"], "limit_tok_s": b / limit,
                   "sparsekv_vs_limit": ours["step_s"] / limit, "sparsekv_vs_transformers": theirs["step_s"] / ours["step_s"]}
            if len(methods) > 1:
                row["methods"] = {m: {"tok_s": timed[m]["tok_s"], "vs_dense": timed[m]["vs_dense"]} for m in methods[1:]}
            result["rows"].append(row)
            print(json.dumps(row))
            Path(args.output).write_text(json.dumps(result, indent=2))
    for ctx in [int(x) for x in args.prefill.split(",") if x]:
        row = {"phase": "prefill", "batch": 1, "context": ctx, **prefill_rates(args.model, hf, args.dtype, ctx, args.prefill_repeats)}
        result["rows"].append(row)
        print(json.dumps(row))
        Path(args.output).write_text(json.dumps(result, indent=2))
    plot(result["rows"], Path(args.output).with_suffix(".png"))


if __name__ == "__main__":
    main()
