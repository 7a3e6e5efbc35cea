"""Compiled CPU paged decode kernel against the machine's read bandwidth and the PyTorch path.

Decode attention is a read of the whole K/V context per token, so the yardstick is memory
bandwidth, measured here as torch.sum over a 1 GiB fp32 tensor (median of 5). One layer of
SmolLM2-135M (Hq 9, Hkv 3, D 64, page 16) in a head-major pool of consecutive pages; the
kernel serves the batch in one call, the PyTorch reference loops over sequences with
matmul-softmax-matmul over in-place views of the pool. On a shared host the 1 GiB figure and
the kernel see different neighbours, so each case also times torch.sum over the same K/V
bytes in turn with the kernel (ratio_to_sum_same_bytes), and with one thread also compares
CPU times (ratio_cpu_time), which leave out the time the process waits for a core.

    python benchmarks/cpu_decode_kernel.py [--contexts 4096,16384] [--batches 1,16] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from timing import interleaved_s, timings_s

from sparsekv.attention.kernels.cpu_decode import available, paged_decode_cpu

HQ, HKV, D, PS = 9, 3, 64, 16


def read_bandwidth() -> float:
    """GB/s of a sum over 1 GiB of fp32 (torch's reduction, all threads)."""
    x = torch.ones(1 << 28)
    seconds = statistics.median(timings_s(x.sum, 5))
    del x
    return (1 << 30) / seconds / 1e9


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")


def reference(q: torch.Tensor, k_hm: torch.Tensor, v_hm: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """Per sequence b (pages [b*n, (b+1)*n) of the head-major pool): GQA matmul-softmax-matmul."""
    n = ctx // PS
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        keys = k_hm[:, b * n:(b + 1) * n].reshape(HKV, ctx, D)  # views, no copy
        vals = v_hm[:, b * n:(b + 1) * n].reshape(HKV, ctx, D)
        logits = torch.matmul(q[b].view(HKV, HQ // HKV, D), keys.transpose(1, 2)) * scale
        out[b] = torch.matmul(logits.softmax(-1), vals).view(HQ, D)
    return out


def run_case(ctx: int, batch: int, dtype: torch.dtype, repeats: int, bandwidth: float) -> dict:
    """One layer's pool of `batch` sequences of `ctx` tokens on consecutive pages."""
    n, scale = ctx // PS, D ** -0.5
    k_hm, v_hm = (torch.randn(HKV, batch * n, PS, D).to(dtype) for _ in range(2))
    k, v = k_hm.transpose(0, 1), v_hm.transpose(0, 1)  # [pages, Hkv, page, D] views
    block_table = torch.arange(batch * n, dtype=torch.int32).view(batch, n)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, HQ, D).to(dtype)
    t = interleaved_s(lambda: paged_decode_cpu(q, k, v, block_table, seq_lens, scale),
                      lambda: (k_hm.sum(), v_hm.sum()), repeats)
    kernel_s, sum_s = statistics.median(t["wall"]), statistics.median(t["base_wall"])
    ref_s = statistics.median(timings_s(lambda: reference(q, k_hm, v_hm, ctx, scale), max(3, repeats // 4)))
    err = (paged_decode_cpu(q, k, v, block_table, seq_lens, scale).float()
           - reference(q, k_hm, v_hm, ctx, scale).float()).abs().max().item()
    kv_bytes = 2 * batch * ctx * HKV * D * k.element_size()
    gbps = kv_bytes / kernel_s / 1e9
    row = {"threads": torch.get_num_threads(), "context": ctx, "batch": batch, "kv_bytes": kv_bytes,
           "kernel_ms": round(kernel_s * 1e3, 3), "kernel_min_ms": round(min(t["wall"]) * 1e3, 3),
           "kernel_gbps": round(gbps, 2), "ratio_to_bandwidth": round(gbps / bandwidth, 3),
           "sum_same_bytes_ms": round(sum_s * 1e3, 3), "ratio_to_sum_same_bytes": round(sum_s / kernel_s, 3),
           "pytorch_ms": round(ref_s * 1e3, 3), "speedup_vs_pytorch": round(ref_s / kernel_s, 2),
           "max_abs_diff": err}
    if torch.get_num_threads() == 1:
        cpu_s, sum_cpu_s = statistics.median(t["cpu"]), statistics.median(t["base_cpu"])
        row.update(kernel_cpu_ms=round(cpu_s * 1e3, 3), kernel_cpu_gbps=round(kv_bytes / cpu_s / 1e9, 2),
                   sum_same_bytes_cpu_ms=round(sum_cpu_s * 1e3, 3), ratio_cpu_time=round(sum_cpu_s / cpu_s, 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="thread counts, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "cpu_decode_kernel.json"))
    args = ap.parse_args()
    if not available():
        raise SystemExit("the CPU decode kernel did not build here (see the log)")
    dtype = getattr(torch, args.dtype)
    bandwidths, rows = {}, []
    for threads in sorted({int(x) for x in args.threads.split(",")}):
        torch.set_num_threads(threads)
        bandwidths[threads] = round(read_bandwidth(), 2)
        print(f"read bandwidth {bandwidths[threads]:.1f} GB/s ({threads} threads)")
        for ctx in (int(x) for x in args.contexts.split(",")):
            for batch in (int(x) for x in args.batches.split(",")):
                rows.append(run_case(ctx, batch, dtype, args.repeats, bandwidths[threads]))
                print(rows[-1])
    result = {
        "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": args.dtype, "read_bandwidth_gbps": bandwidths, "load_average": os.getloadavg(),
        "shapes": {"hq": HQ, "hkv": HKV, "head_dim": D, "page_size": PS}, "repeats": args.repeats,
        "torch": torch.__version__, "rows": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
