"""The decode step's linears: the compiled small-row GEMM vs F.linear (MKL) vs the read bandwidth.

Each of the default model's projection shapes (qkv, gate/up, down, the tied lm_head) at 1, 4
and 16 rows; every timed call runs over enough copies of the weight (~300 MB) that it streams
from DRAM as in a real step, not from the last-level cache. The two are timed in turn.

    python benchmarks/small_gemm.py [--rows 1,4,16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved_s

from sparsekv.attention.kernels.cpu_build import ops
from sparsekv.bench.bandwidth import cpu_description, read_bandwidth

SHAPES = {"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "small_gemm.json"))
    args = p.parse_args()
    bandwidth = read_bandwidth()
    result = {**cpu_description(), "read_bandwidth_gbs": bandwidth / 1e9, "rows": []}
    g = torch.Generator().manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        for site, (n, k) in SHAPES.items():
            weights = [torch.randn(n, k, generator=g) for _ in range(max(1, int(300e6 // (n * k * 4))))]
            x = torch.randn(m, k, generator=g)
            t = interleaved_s(lambda: [ops().small_gemm(x, w, None) for w in weights],
                              lambda: [F.linear(x, w) for w in weights], args.repeats)
            gb = sum(w.numel() * 4 for w in weights) / 1e9
            ours, mkl = gb / statistics.median(t["wall"]), gb / statistics.median(t["base_wall"])
            row = {"rows": m, "site": site, "n": n, "k": k, "small_gemm_gbs": ours, "mkl_gbs": mkl,
                   "speedup": ours / mkl, "small_gemm_vs_bandwidth": ours * 1e9 / bandwidth,
                   "max_abs_diff": (ops().small_gemm(x, weights[0], None) - F.linear(x, weights[0])).abs().max().item()}
            result["rows"].append(row)
            print(json.dumps(row))
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
