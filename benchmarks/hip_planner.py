"""HiP's mask planner alone (one layer's prefill search, no attention) across context lengths,
with a fitted a * T log2 T + b curve: the paper claims O(T log T) time.

Synthetic Llama-3-8B-shaped inputs (sparsekv.bench.synthetic, 32 query heads, 8 KV heads, D 128)
in a paged pool; the search is the backend's (`prefill_lists`) with the Triton probe on CUDA, and
on CPU with both the compiled search (the backend's, csrc/hip_search.cpp) and the PyTorch
reference, alternated per repeat in one run so a shared machine slows both alike: each length's
row gives both medians, their ratio, and whether they chose the same blocks. Writes results.json
and planner.png (points and fitted curve of the backend's planner) to --output and prints one row
per length with the fit's residual.

    python benchmarks/hip_planner.py --lengths 8192,16384,32768,65536 --output results/hip_planner
    python benchmarks/hip_planner.py --preset infinitehip ...   # the staged search
    python benchmarks/hip_planner.py --no-reference ...         # CPU: the compiled planner only
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from sparsekv.attention.hip_plan import prefill_lists
from sparsekv.attention.hip_search import cpu_probe, torch_probe
from sparsekv.attention.xattention_select import BlockGeometry
from sparsekv.bench.synthetic import paged_pool, synthetic_qkv
from sparsekv.config import preset


def plan_once(p, q, k, kv, device, reference: bool = False) -> tuple[float, tuple]:
    """Seconds for one search over the whole prompt, and its (lists, counts, unit_kv, pairs);
    `reference`: the PyTorch probe and loop on CPU instead of the compiled search."""
    length, hkv = q.shape[0], k.shape[0]
    geom = BlockGeometry(p.block_size_q, length, length)
    if device.type == "cuda":
        from sparsekv.attention.kernels.hip_probe import paged_probe

        table = torch.arange(kv.k.shape[0], device=device, dtype=torch.int32)
        probe_for = lambda qs, ukv: paged_probe(qs, kv, table, ukv)  # noqa: E731
    else:
        kp = torch.nn.functional.pad(k, (0, 0, 0, geom.num_kblocks * p.block_size_q - length))
        make = torch_probe if reference else cpu_probe
        probe_for = lambda qs, ukv: make(qs, kp, ukv)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    lists = prefill_lists(p, q, geom, hkv, probe_for)
    sync()
    return time.perf_counter() - t, lists


def fit(lengths: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares of seconds = a * T log2 T + b."""
    x = torch.tensor([t * math.log2(t) for t in lengths], dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1),
                              torch.tensor(seconds, dtype=torch.float64).view(-1, 1)).solution.flatten().tolist()
    return a, b


def plot(lengths, seconds, a, b, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(min(lengths), max(lengths), 100).tolist()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [1e3 * s for s in seconds], "o", label=f"{name} planner (measured)")
    ax.plot(grid, [1e3 * (a * t * math.log2(t) + b) for t in grid], "-", label="fit a·T·log2 T + b")
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel("planning time per layer (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--preset", default="hip", help="hip | infinitehip | a SparsityConfig JSON")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-reference", action="store_true", help="CPU: skip the PyTorch reference planner")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p = preset(args.preset).prefill.params("prefill")
    lengths = [int(x) for x in args.lengths.split(",")]
    reference = device.type == "cpu" and not args.no_reference
    rows = []
    for length in lengths:
        q, k, v = synthetic_qkv(length, 0, dtype, device)
        kv = paged_pool(k, v)
        runs, refs = [], []
        for _ in range(args.repeats):
            runs.append(plan_once(p, q, k, kv, device))
            if reference:
                refs.append(plan_once(p, q, k, kv, device, reference=True))
        causal = length * (length + 1) // 2 * q.shape[1]
        row = {"length": length, "planner_s": statistics.median(r[0] for r in runs),
               "attended_fraction": int(runs[0][1][3]) / causal}
        if reference:
            row["reference_s"] = statistics.median(r[0] for r in refs)
            row["speedup"] = row["reference_s"] / row["planner_s"]
            row["same_selection"] = all(torch.equal(a, b) for a, b in zip(runs[0][1], refs[0][1]))
        rows.append(row)
    secs = [r["planner_s"] for r in rows]
    a, b = fit(lengths, secs)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device), "preset": args.preset, "params": p.model_dump(), "fit": {"a": a, "b": b},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(lengths, secs, a, b, out / "planner.png", args.preset)
    extra = f" {'reference ms':>13} {'speedup':>8} {'same':>5}" if reference else ""
    print(f"{'length':>8} {'planner ms':>11} {'fit ms':>9} {'attended':>9}" + extra)
    for r in rows:
        t = r["length"]
        extra = (f" {1e3 * r['reference_s']:>13.1f} {r['speedup']:>8.2f} {str(r['same_selection']):>5}"
                 if reference else "")
        print(f"{t:>8} {1e3 * r['planner_s']:>11.1f} {1e3 * (a * t * math.log2(t) + b):>9.1f} "
              f"{r['attended_fraction']:>9.3f}" + extra)


if __name__ == "__main__":
    main()
