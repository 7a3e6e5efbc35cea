"""Dense decode over the paged pool vs SDPA over a contiguous cache of the same length.

The engine's CPU decode reads a head-major pool in place (consecutive pages) or after one
gather (fragmented block table); the baseline is torch SDPA with GQA on contiguous K/V. One
decode query, Llama-3-8B head shapes, median of --repeats, side by side in one process.

    python benchmarks/dense_decode.py [--lengths 4096,16384,65536] [--threads 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparsekv.attention.backend import LayerKV
from sparsekv.attention.paged import decode_attention, gather_kv


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "dense_decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hq, hkv, d, ps = 32, 8, 128, 16
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        n = length // ps
        kv = LayerKV.allocate(n, hkv, ps, d, dtype)
        kv.k.normal_()
        kv.v.normal_()
        q = torch.randn(hq, d, dtype=dtype)
        kc, vc = (x.transpose(0, 1).reshape(1, hkv, length, d).clone() for x in (kv.k, kv.v))
        consecutive, fragmented = torch.arange(n), torch.randperm(n)
        cases = {
            "paged_consecutive": lambda: decode_attention(q, *gather_kv(kv, consecutive, length), d ** -0.5),
            "paged_fragmented": lambda: decode_attention(q, *gather_kv(kv, fragmented, length), d ** -0.5),
            "sdpa_contiguous": lambda: torch.nn.functional.scaled_dot_product_attention(
                q.view(1, hq, 1, d), kc, vc, enable_gqa=True),
        }
        times = {name: median_ms(fn, args.repeats) for name, fn in cases.items()}
        row = {"length": length, **{k: round(v, 3) for k, v in times.items()},
               "speedup_vs_sdpa": round(times["sdpa_contiguous"] / times["paged_consecutive"], 2),
               "fragmented_speedup_vs_sdpa": round(times["sdpa_contiguous"] / times["paged_fragmented"], 2)}
        rows.append(row)
        print(row, flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "threads": args.threads, "dtype": args.dtype,
                               "shape": {"hq": hq, "hkv": hkv, "head_dim": d, "page": ps},
                               "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
