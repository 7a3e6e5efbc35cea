"""`sparsekv bench attention`: attention-only time of sparse methods against dense attention.

The inputs are synthetic queries and keys at Llama-3-8B head shapes (32 query heads, 8 KV heads,
head_dim 128) with the structure real attention has (a sink, a local band, a few heavy keys every
query wants), or with --qkv-from one layer's q/k/v captured from a real model on a needle task
(bench/captured.py), at that model's shapes. Either sits in a paged pool and goes through the
backends as the model calls them. Prefill methods run one layer over the whole prompt, against
the faster of the dense backend and torch SDPA on contiguous tensors. Decode methods run one
decode step through `--num-layers` layers in order with one plan per step (one pool reused for
every layer: captured inputs have one layer too), against the dense backend the same way; the
dense rows carry the bandwidth limit (KV bytes read / read bandwidth measured in the run). A
backend that wraps its selection in torch.profiler.record_function("<name>.select") gets that
time reported as scoring_ms.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from sparsekv.bench.synthetic import PAGE, paged_pool, synthetic_qkv

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="dense,xattention", help="presets, backend names or SparsityConfig JSONs")
    p.add_argument("--lengths", default="8192,16384,32768,65536", help="context lengths in tokens")
    p.add_argument("--output", required=True, help="directory for results.json and attention.png")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--phase", default="auto", choices=["auto", "prefill", "decode"],
                   help="auto: each method's own phase")
    p.add_argument("--num-layers", type=int, default=None,
                   help="layers per decode step (default: 32, or the --qkv-from model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: what the CPU runs natively (bfloat16 only with AVX512-BF16/AMX), bfloat16 on CUDA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qkv-from", default=None, metavar="MODEL",
                   help="capture q/k/v from this model on a needle prompt per length (cached in --output) "
                        "instead of the synthetic inputs")
    p.add_argument("--capture-layer", type=int, default=None, help="with --qkv-from: the layer (default: the middle)")
    p.add_argument("--capture-task", default=None, help="with --qkv-from: the sparsekv.eval task (default: niah_single)")


def resolve(name: str):
    """(backend name, params, phases) for a preset, a backend name or a SparsityConfig JSON."""
    from sparsekv.attention.backend import known_methods, params_class
    from sparsekv.config import PRESETS, preset

    def phases(method: str) -> tuple[str, ...]:
        return tuple(p for p in ("prefill", "decode") if method in known_methods(p))

    if name not in PRESETS and phases(name):
        return name, params_class(name, phases(name)[0])(), phases(name)
    cfg = preset(name)
    for phase, spec in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        if spec.method != "dense":
            return spec.method, spec.params(phase), phases(spec.method)
    return "dense", cfg.prefill.params("prefill"), phases("dense")


def times_ms(fn, repeats: int, sync) -> list[float]:
    """Wall times of fn() over `repeats` calls after one warm-up; a first call over 2 s needs
    no warm-up and counts."""
    def timed() -> float:
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    first = timed()
    times = [first] if first >= 2.0 else []
    times += [timed() for _ in range(repeats - len(times))]
    return [1e3 * t for t in times]


def median_ms(fn, repeats: int, sync) -> float:
    return statistics.median(times_ms(fn, repeats, sync))


def select_ms(fn) -> float:
    """Wall time inside `*.select` profiler ranges during one call of fn()."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.cpu_time_total for e in prof.key_averages() if e.key.endswith(".select")) / 1e3


class Case:
    """One context length's inputs (q [L+1, Hq, D], k, v [Hkv, L+1, D]; the last token decodes),
    its pool, and the dense baselines (measured once)."""

    def __init__(self, length: int, q, k, v, args, device):
        import torch

        self.length, self.args, self.device = length, args, device
        self.hq, self.hkv, self.head_dim = q.shape[1], k.shape[0], q.shape[2]
        self.q, self.q_decode = q[:length].contiguous(), q[length:].contiguous()
        self.k, self.v = k[:, :length].contiguous(), v[:, :length].contiguous()
        self.kv = paged_pool(k, v)
        self.table = torch.arange(self.kv.k.shape[0], device=device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.baselines: dict[str, dict] = {}

    def group(self, phase: str, q_len: int, context_len: int):
        from sparsekv.attention.metadata import AttnMetadata, RequestInput

        reqs = [RequestInput(q_len, context_len, self.table.tolist(), phase)]
        return AttnMetadata.build(reqs, PAGE, self.device).group(phase, 0, 1)

    def call(self, backend, phase: str):
        """One step: the plan, then the layers (prefill: the whole prompt through one layer)."""
        from sparsekv.attention.backend import AttnShape

        layers = self.args.num_layers if phase == "decode" else 1
        q = self.q_decode if phase == "decode" else self.q
        group = self.group(phase, q.shape[0], self.length + (phase == "decode"))
        shape = AttnShape(layers, self.hq, self.hkv, self.head_dim, self.head_dim ** -0.5)
        pairs = group.causal_pairs_cpu()[0] * self.hq * layers
        last: dict = {}

        def step():  # fresh metadata each step, as the engine builds it (HiP counts steps by it)
            plan = backend.plan(self.group(phase, q.shape[0], self.length + (phase == "decode")), shape)
            for layer in range(layers):
                backend.forward(q, self.kv, layer, plan)
            last["plan"] = plan
        return step, lambda: float(last["plan"].attended.sum()) / pairs

    def measure(self, phase: str, backend) -> dict:
        """median_ms and attended_fraction (+ extras) of one method in one phase."""
        repeats = self.args.repeats
        fn, fraction = self.call(backend, phase)
        times = times_ms(fn, repeats, self.sync)
        # mean_ms: methods that refresh a cached selection every few steps (HiP) pay it on some
        # steps only, so the mean over a multiple of the interval is the amortized step
        row = {"median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
               "attended_fraction": fraction()}
        if phase == "prefill":
            if backend.name != "dense":
                row["scoring_ms"] = select_ms(fn)
            return row
        kv_bytes = row["attended_fraction"] * 2 * self.kv.k.numel() * self.kv.k.element_size() * self.args.num_layers
        return {**row, "num_layers": self.args.num_layers, "kv_bytes": int(kv_bytes),
                "bandwidth_limit_ms": 1e3 * kv_bytes / self.args.bandwidth}

    def dense(self, phase: str) -> dict:
        """The dense backend's row, and the baseline `ms`: the faster of it and (prefill) SDPA."""
        if phase not in self.baselines:
            from sparsekv.attention.backend import get_backend

            row = self.measure(phase, get_backend("dense", resolve("dense")[1], self.device.type))
            extra = {"dense_backend_ms": row["median_ms"]}
            if phase == "prefill":
                extra["sdpa_ms"] = self.sdpa_ms()
            self.baselines[phase] = {"row": row, "ms": min(extra.values()), "extra": extra}
        return self.baselines[phase]

    def sdpa_ms(self) -> float:
        """torch SDPA, causal, on contiguous [1, H, L, D] tensors (its fast CPU kernel)."""
        import torch

        q = self.q.transpose(0, 1).contiguous()[None]
        return median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, self.k[None], self.v[None], is_causal=True, enable_gqa=True), self.args.repeats, self.sync)


def device_info(device) -> dict:
    import torch

    from sparsekv.bench.bandwidth import cpu_description

    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    cpu = cpu_description()
    return {"device": f"cpu: {cpu['cpu']} ({cpu['capability']}), {cpu['threads']} threads, torch {cpu['torch']}", **cpu}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["method"], r["phase"]) for r in rows}):
        pts = sorted((r["length"], r["speedup"]) for r in rows if (r["method"], r["phase"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} ({key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("speedup vs dense attention")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


WARM_UP_LENGTH = 2048


def warm_up(jobs: list, length: int, args: argparse.Namespace, dtype, device, capture) -> None:
    """One call of every job at a short length first, so that what a backend builds or loads on
    first use (the CPU kernel library, Triton's JIT) is never timed: times_ms counts a long first
    call, which at 16K once made HiP's median half compile time."""
    qkv = capture.qkv(length, dtype, device) if capture else synthetic_qkv(length + 1, args.seed, dtype, device)
    case = Case(length, *qkv, args, device)
    for _, _, phase, backend in jobs:
        case.call(backend, phase)[0]()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sparsekv.attention.backend import get_backend

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    info = device_info(device)
    if args.dtype == "auto":  # never emulated bf16: many times slower than float32 on AVX2 CPUs
        dtype = torch.bfloat16 if device.type == "cuda" or info.get("native_bf16") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    from sparsekv.bench.bandwidth import read_bandwidth

    args.bandwidth = read_bandwidth(device.type)
    info["read_bandwidth_gbs"] = args.bandwidth / 1e9
    jobs = []
    for name in args.methods.split(","):
        method, params, phases = resolve(name)
        for phase in phases if args.phase == "auto" else (args.phase,):
            if phase not in phases:
                raise ValueError(f"{name} has no {phase} phase (it has {', '.join(phases)})")
            jobs.append((name, method, phase, get_backend(method, params, device.type)))
    if args.phase == "auto":  # dense only in the phases the sparse methods are measured in
        measured = {j[2] for j in jobs if j[1] != "dense"} or {"prefill"}
        jobs = [j for j in jobs if j[1] != "dense" or j[2] in measured]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    capture = None
    if args.qkv_from:
        from sparsekv.bench.captured import DEFAULT_TASK, Capture

        capture = Capture(args.qkv_from, args.capture_layer, args.capture_task or DEFAULT_TASK, args.seed, out,
                          max(lengths))
    elif args.capture_layer is not None or args.capture_task:
        raise ValueError("--capture-layer and --capture-task need --qkv-from")
    if args.num_layers is None:
        args.num_layers = capture.num_layers if capture else 32
    result = {**info, "dtype": str(dtype).removeprefix("torch."),
              "inputs": capture.inputs if capture else "synthetic", "rows": []}
    warm_up(jobs, min(WARM_UP_LENGTH, *lengths), args, dtype, device, capture)
    with tqdm(total=len(lengths) * len(jobs), desc="bench attention") as bar:
        for length in lengths:
            qkv = capture.qkv(length, dtype, device) if capture else synthetic_qkv(length + 1, args.seed, dtype, device)
            case = Case(length, *qkv, args, device)
            for name, method, phase, backend in jobs:
                bar.set_postfix_str(f"{name} {phase} {length}")
                base = case.dense(phase)
                row = base["row"] if method == "dense" else case.measure(phase, backend)
                row = {"phase": phase, "length": length, "method": name, **row, "dense_median_ms": base["ms"],
                       "speedup": base["ms"] / row["median_ms"], **base["extra"]}
                result["rows"].append(row)
                (out / "results.json").write_text(json.dumps(result, indent=2))
                logger.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                bar.update()
            del case  # free this length's tensors before the next is built
    plot(result["rows"], out / "attention.png")
    print(f"{'phase':8} {'length':>7} {'method':12} {'ms':>10} {'dense ms':>10} {'speedup':>8} {'attended':>8}")
    for r in result["rows"]:
        print(f"{r['phase']:8} {r['length']:>7} {r['method']:12} {r['median_ms']:>10.1f} "
              f"{r['dense_median_ms']:>10.1f} {r['speedup']:>8.2f} {r['attended_fraction']:>8.3f}")
    return 0
