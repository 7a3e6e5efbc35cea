"""Mustafar on the default model: KV bytes, decode attention step, end-to-end decode, capacity.

1. bytes: one compressed page (per token `keep` values + a D-bit channel bitmap, metadata
   included) over a dense page at each sparsity, from the pool's real tensors; the paper's
   bitmap tiles beside it, counted on the same pruned K and V (K tiles run along tokens, V tiles
   along channels).
2. attention: one layer's decode step (batch requests of `length` cached tokens) through the
   Mustafar backend over a compressed cache vs the dense backend over a dense one, medians;
   with --quest-budget also Quest selecting among the compressed pages, paired with dense too.
3. e2e: decode tokens/s of one request after a `length`-token prompt, dense vs Mustafar (vs
   Mustafar + Quest).
4. capacity: how many `--concurrent-len`-token sequences the block manager can hold at a fixed
   KV memory (staging rows paid first), each count checked by building the engine.

    python benchmarks/mustafar.py [--model PATH] [--sparsities 0.5,0.7] [--lengths 16384,32768,65536]
        [--batch 1,4] [--e2e-lengths 4096] [--concurrent-len 8192] [--kv-memory 1073741824] [--skip e2e]
Writes results/mustafar.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from timing import interleaved_s

RESULTS = Path(__file__).parent / "results"


def geometry(model: str | None) -> dict:
    from sparsekv.config import default_model
    from sparsekv.engine.loader import read_config

    cfg = read_config(model or default_model())
    return {"layers": cfg["num_hidden_layers"], "hkv": cfg["num_key_value_heads"], "hq": cfg["num_attention_heads"],
            "d": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]}


def layout_for(sparsity: float, d: int):
    from sparsekv.cache.compressed import MustafarLayout
    from sparsekv.config import KVSection

    kv = KVSection(prune="mustafar", sparsity=sparsity)
    return MustafarLayout(*kv.mustafar_keep(d), kv.local_window, kv.compress_chunk)


def bitmap_bytes(x: torch.Tensor, keep: int, along_tokens: bool, elem: int) -> int:
    """Bytes of the paper's format for pruned x [T, D]: tiles of 64 along tokens (K) or channels (V)."""
    from sparsekv.cache.kv_prune import bitmap_tile_bytes, prune

    nz = prune(x, keep) != 0
    tiles = (nz.T if along_tokens else nz).reshape(-1, 64).sum(-1)
    return sum(bitmap_tile_bytes(int(n), elem) for n in tiles)


def kv_bytes(geo: dict, sparsities: list[float]) -> list[dict]:
    from sparsekv.cache.compressed import CompressedKVCache

    rows, d, hkv, ps = [], geo["d"], geo["hkv"], 16
    x = torch.randn(4096, d)
    for dtype in (torch.float32, torch.bfloat16):
        elem = dtype.itemsize
        dense = 2 * ps * d * elem  # one head's page of K and V
        for s in sparsities:
            layout = layout_for(s, d)
            cache = CompressedKVCache(1, 4, 1, ps, hkv, d, dtype, "cpu", layout)
            kv = cache.layers[0]
            ours = sum(t[0, 0].nbytes for t in (kv.kc, kv.kb, kv.vc, kv.vb))
            paper = (bitmap_bytes(x, layout.k_keep, True, elem) + bitmap_bytes(x, layout.v_keep, False, elem)
                     + 2 * 4) / (x.shape[0] / ps)  # + the final offset of each head's K and V
            rows.append({"dtype": str(dtype).split(".")[-1], "sparsity": s, "k_keep": layout.k_keep,
                         "ours_vs_dense": round(ours / dense, 4), "bitmap_vs_dense": round(paper / dense, 4)})
            print(rows[-1], flush=True)
    return rows


def attention_step(geo: dict, sparsity: float, length: int, batch: int, repeats: int, quest_budget: int) -> dict:
    """Seconds of one layer's decode over `batch` requests of `length` tokens: the dense backend
    over a dense pool vs Mustafar over a compressed one holding the same K/V, both filled by a
    real prefill step and then one decode step's write (which compresses the prompt)."""
    from sparsekv.attention.backend import AttnShape, BackendParams, get_backend
    from sparsekv.attention.metadata import AttnMetadata, RequestInput
    from sparsekv.cache.compressed import CompressedKVCache
    from sparsekv.attention.quest import QuestParams
    from sparsekv.cache.kv_cache import PAGE_BOUNDS, KVCache, WriteIndex

    ps, hkv, hq, d = 16, geo["hkv"], geo["hq"], geo["d"]
    shape = AttnShape(1, hq, hkv, d, d ** -0.5)
    per = -(-length // ps)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    pages = batch * per
    dense = KVCache(1, pages, ps, hkv, d, torch.float32, "cpu")
    comp = CompressedKVCache(1, pages, pages + 2 * batch, ps, hkv, d, torch.float32, "cpu", layout_for(sparsity, d))
    if quest_budget:
        comp.ensure(PAGE_BOUNDS)
    g = torch.Generator().manual_seed(0)
    for phase, q_len, ctx in (("prefill", length - 1, length - 1), ("decode", 1, length)):
        meta = AttnMetadata.build([RequestInput(q_len, ctx, t, phase, i) for i, t in enumerate(tables)], ps,
                                  torch.device("cpu"))
        idx = WriteIndex.from_slots(meta.slot_mapping, ps)
        k, v = (torch.randn(meta.num_actual_tokens, hkv, d, generator=g) for _ in range(2))
        for cache in (dense, comp):
            cache.plan_step(meta)
            cache.begin_step(idx)
            cache.write(0, k, v, idx)
    q = torch.randn(batch, hq, d, generator=g)
    def step(name: str, cache, params: BackendParams):
        be = get_backend(name, params)
        plan = be.plan(meta.group("decode", 0, batch), shape)
        return lambda: be.forward(q, cache.layers[0], 0, plan)

    dense_step = step("dense", dense, BackendParams())
    variants = [("mustafar", step("mustafar", comp, BackendParams()))]
    if quest_budget:
        variants.append(("mustafar_quest", step("mustafar_quest", comp, QuestParams(budget=quest_budget))))
    out = {}
    for name, fn in variants:
        t = interleaved_s(fn, dense_step, repeats)  # in turn, so both see the same neighbours on a shared host
        out[f"{name}_dense_s"] = statistics.median(t["base_wall"])
        out[f"{name}_s"] = statistics.median(t["wall"])
        out[f"{name}_speedup"] = round(out[f"{name}_dense_s"] / out[f"{name}_s"], 3)
        if torch.get_num_threads() == 1:  # CPU time leaves out time spent waiting for a core
            out[f"{name}_speedup_cpu_time"] = round(statistics.median(t["base_cpu"]) / statistics.median(t["cpu"]), 3)
    return out


def e2e(model: str | None, sparsity: float, length: int, output_len: int, quest_budget: int) -> dict:
    from sparsekv import LLM, SamplingParams
    from sparsekv.attention.kernels import cpu_compressed

    row = {"compiled_kernel": cpu_compressed.available()}  # fp32 at head dim 64: decode runs it
    pruned = {"kv": {"prune": "mustafar", "sparsity": sparsity}}
    variants = [("dense", None), ("mustafar", pruned)]
    if quest_budget:
        variants.append(("mustafar_quest", {**pruned, "decode": {"method": "quest", "budget": quest_budget}}))
    for name, sp in variants:
        llm = LLM(model, dtype="float32", max_model_len=length + output_len + 16, max_num_seqs=1,
                  max_num_batched_tokens=4096, enable_prefix_caching=False, **({"sparsity": sp} if sp else {}))
        prompt = torch.randint(10, llm.engine.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                           use_tqdm=False)[0]
        row[f"{name}_decode_tok_s"] = round((len(out.outputs[0].token_ids) - 1) / out.metrics.decode_seconds, 2)
        del llm
        gc.collect()
    return row


def capacity(model: str | None, geo: dict, sparsity: float | None, seq_len: int, kv_memory: int) -> int:
    """Most sequences of seq_len tokens the pool admits at kv_memory (with max_num_seqs that
    count, since the staging pool grows with it): solved from the pool's sizes, then checked by
    building the engine at n (admits n) and n + 1 (does not)."""
    from sparsekv.cache.kv_cache import KVCache
    from sparsekv.config import EngineConfig
    from sparsekv.engine.llm_engine import LLMEngine

    ps, batched = 16, 2048
    per_seq = -(-seq_len // ps)
    dense_page = KVCache.bytes_per_page(geo["layers"], ps, geo["hkv"], geo["d"], torch.float32)
    layout = layout_for(sparsity, geo["d"]) if sparsity else None

    def pages(n: int) -> int:
        if layout is None:
            return kv_memory // dense_page
        left = kv_memory - layout.staging_rows(n, batched, ps) * dense_page
        return left // layout.page_bytes(geo["layers"], ps, geo["hkv"], geo["d"], 4) if left > 0 else 0

    n = 0
    while pages(n + 1) >= (n + 1) * per_seq:
        n += 1

    def admits(m: int) -> bool:
        sp = {"kv": {"prune": "mustafar", "sparsity": sparsity}} if sparsity else {}
        try:
            eng = LLMEngine(EngineConfig(model=model, dtype="float32", max_model_len=seq_len, max_num_seqs=max(m, 1),
                                         max_num_batched_tokens=batched, kv_cache_memory=kv_memory, sparsity=sp))
        except ValueError:  # not even one sequence fits
            return False
        ok = eng.block_manager.num_free_blocks >= m * per_seq
        del eng
        gc.collect()
        return ok
    assert (n == 0 or admits(n)) and not admits(n + 1), "the pool's sizing and the solved count disagree"
    return n


def main() -> None:
    from sparsekv.bench.bandwidth import cpu_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--lengths", default="16384,32768,65536", help="attention-step context lengths")
    ap.add_argument("--batch", default="1,4", help="attention-step batch sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--e2e-lengths", default="4096")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrent-len", type=int, default=8192)
    ap.add_argument("--kv-memory", type=int, default=1 << 30, help="bytes of KV memory for the capacity count")
    ap.add_argument("--quest-budget", type=int, default=1024, help="Quest over the compressed pages (0: not run)")
    ap.add_argument("--skip", default="", help="comma list of bytes,attention,e2e,capacity to leave out")
    ap.add_argument("--output", default=str(RESULTS / "mustafar.json"))
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    geo = geometry(args.model)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    result = {**cpu_description(), "geometry": geo, "threads": torch.get_num_threads()}
    if "bytes" not in skip:
        result["bytes"] = kv_bytes(geo, sparsities)
    if "attention" not in skip:
        result["attention"] = []
        for length in (int(x) for x in args.lengths.split(",")):
            for batch in (int(x) for x in args.batch.split(",")):
                for s in sparsities:
                    row = {"length": length, "batch": batch, "sparsity": s,
                           **attention_step(geo, s, length, batch, args.repeats, args.quest_budget)}
                    result["attention"].append(row)
                    print(row, flush=True)
    if "e2e" not in skip:
        result["e2e"] = []
        for length in (int(x) for x in args.e2e_lengths.split(",")):
            for s in sparsities:
                row = {"length": length, "sparsity": s, **e2e(args.model, s, length, args.output_len, args.quest_budget)}
                result["e2e"].append(row)
                print(row, flush=True)
    if "capacity" not in skip:
        row = {"seq_len": args.concurrent_len, "kv_memory": args.kv_memory,
               "dense": capacity(args.model, geo, None, args.concurrent_len, args.kv_memory)}
        for s in sparsities:
            row[f"mustafar_{s}"] = capacity(args.model, geo, s, args.concurrent_len, args.kv_memory)
        result["capacity"] = row
        print(row, flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
