"""vLLM dense vs vLLM + sparsekv's methods (the plugin), with `sparsekv serve` beside them.

For each method, one `vllm serve` (SPARSEKV_SPARSITY_CONFIG=method; unset for dense) and one
`sparsekv serve` on the same weights (vLLM reads the GGUF exported dequantized); against each
endpoint `sparsekv bench serve` per prompt length (TTFT/TPOT) and `sparsekv eval --endpoint`
(RULER-style scores); the plugin's attended fraction from SPARSEKV_VLLM_STATS. Everything
lands in one results JSON.

    python benchmarks/vllm_plugin.py --lengths 4096,7680 --methods dense,xattention,quest \\
        [--vllm-python /work/venvs/vllm/bin/python] [--num-prompts 8] [--eval-samples 10]

The default model's context is 8K: past it (16K) pass a rope-scaling override to both engines
(--vllm-args=... and --sparsekv-args=...).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(proc: subprocess.Popen, base: str, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"server at {base} did not come up in {timeout} s")


def client_runs(args, base: str, method: str, out: Path) -> dict:
    """bench serve per length and one eval, through the same client commands for any server."""
    cli = [sys.executable, "-m", "sparsekv.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    row = {"bench": {}}
    for length in args.lengths:
        d = out / f"bench-{length}"
        subprocess.run([*cli, "bench", "serve", "--endpoint", base, "--model", args.model, "--input-len", str(length),
                        "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                        "--max-concurrency", "1", "--output", str(d)], check=True, env=env)
        rep = json.loads((d / "results.json").read_text())
        row["bench"][length] = {k: v for k, v in rep.items() if k != "requests"}
    if args.eval_samples:
        d = out / "eval"
        subprocess.run([*cli, "eval", "--endpoint", base, "--model", args.model, "--served-model-name", "m",
                        "--tasks", args.eval_tasks, "--lengths", ",".join(map(str, args.lengths)),
                        "--samples", str(args.eval_samples), "--methods", method, "--output", str(d)],
                       check=True, env=env)
        row["eval"] = json.loads((d / "results.json").read_text())
    return row


def serve(cmd: list[str], env: dict, log: Path):
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def method_config(method: str, block_size: int) -> str:
    """The preset, its selection pages raised to vLLM's block size: one config for both engines."""
    from sparsekv.config import preset

    sp = preset(method)
    cfg = sp.model_dump(mode="json")
    for phase in ("prefill", "decode"):
        page = getattr(getattr(sp, phase).params(phase), "page_size", None)
        if page is not None:
            cfg[phase]["page_size"] = -(-page // block_size) * block_size
    return json.dumps(cfg)


def run_engine(args, engine: str, method: str, out: Path) -> dict:
    port, out = free_port(), out / f"{engine}-{method}"
    out.mkdir(parents=True, exist_ok=True)
    sparsity = method_config(method, args.block_size)
    env = {"VLLM_CPU_KVCACHE_SPACE": "4",  # GiB; unset, vLLM's CPU build asks for 92% of memory
           **os.environ, "PYTHONPATH": f"{args.plugin_path}{os.pathsep}{ROOT}"}
    env.pop("SPARSEKV_SPARSITY_CONFIG", None)
    stats = out / "attended.json"
    max_len = str(max(args.lengths) + max(args.output_len, 128) + 64)  # 128: the eval tasks' answer budget
    if engine == "vllm":
        if method != "dense":
            env.update(SPARSEKV_SPARSITY_CONFIG=sparsity, SPARSEKV_VLLM_STATS=str(stats))
        # `vllm serve`'s server; by module since vllm-cpu 0.32.0's `vllm` script cannot find its own metadata
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.hf_model,
               "--served-model-name", "m",
               "--port", str(port), "--max-model-len", max_len, "--dtype", args.dtype,
               "--block-size", str(args.block_size), *shlex.split(args.vllm_args)]
    else:
        cfg = out / "sparsity.json"
        cfg.write_text(sparsity)
        cmd = [sys.executable, "-m", "sparsekv.cli", "serve", "--model", args.model, "--served-model-name", "m",
               "--port", str(port), "--max-model-len", max_len, "--dtype", args.dtype, "--sparsity-config", str(cfg),
               *shlex.split(args.sparsekv_args)]
    log = out / "server.log"
    proc = serve(cmd, env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(proc, base, log)
        row = {"server_command": cmd, "sparsity": json.loads(sparsity), **client_runs(args, base, method, out)}
    finally:
        proc.terminate()
        proc.wait(120)
    if stats.exists():
        row["attended"] = json.loads(stats.read_text())
    return row


def plugin_dist(root: Path) -> Path:
    """The entry point `pip install sparsekv[vllm]` declares, for a source checkout."""
    info = root / "plugin" / "sparsekv_vllm_plugin-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsekv-vllm-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nsparsekv = sparsekv.vllm_plugin:register\n")
    return root / "plugin"


def main() -> None:
    from sparsekv.bench.bandwidth import cpu_description
    from sparsekv.config import default_model
    from sparsekv.vllm_plugin.checkpoint import export_hf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="sparsekv's model (default: the default model's GGUF)")
    ap.add_argument("--lengths", default="4096,7680", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--methods", default="dense,xattention,quest")
    ap.add_argument("--engines", default="vllm,sparsekv")
    ap.add_argument("--vllm-python", default=os.environ.get("SPARSEKV_VLLM_PYTHON", "/work/venvs/vllm/bin/python"))
    ap.add_argument("--block-size", type=int, default=32, help="vLLM's KV block (a multiple of 32 on CPU)")
    ap.add_argument("--vllm-args", default="", help="extra `vllm serve` flags (write --vllm-args=--flag)")
    ap.add_argument("--sparsekv-args", default="", help="extra `sparsekv serve` flags")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=10, help="0 skips the eval")
    ap.add_argument("--eval-tasks", default="niah_single,vt")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_plugin")
    ap.add_argument("--rerun", action="store_true", help="measure runs the results JSON already holds again")
    args = ap.parse_args()
    args.model = args.model or default_model()
    args.hf_model = str(export_hf(args.model, args.output / "hf-model"))
    args.plugin_path = plugin_dist(args.output)
    path = args.output / "results.json"  # runs of earlier invocations (other --engines/--methods) are kept
    results = json.loads(path.read_text()) if path.exists() else {"model": args.model, "runs": {}}
    results.update(machine=cpu_description(), vllm=vllm_version(args.vllm_python), dtype=args.dtype)
    for method in args.methods.split(","):
        for engine in args.engines.split(","):
            name = f"{engine}-{method}"
            if name in results["runs"] and not args.rerun and done_lengths(results["runs"][name]) >= set(args.lengths):
                print(f"{name}: done, kept (--rerun to measure again)")
                continue
            results["runs"][name] = run_engine(args, engine, method, args.output)
            path.write_text(json.dumps(results, indent=1))
    plot(results, args.output / "vllm_plugin.png")
    print(f"results: {path}")


def done_lengths(row: dict) -> set[int]:
    return {int(n) for n in row.get("bench", {})}


def vllm_version(python: str) -> str | None:
    try:
        return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                              timeout=300).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def plot(results: dict, path: Path) -> None:
    """Median TTFT and TPOT per run and prompt length (one bar group per length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    lengths = sorted({int(n) for r in runs.values() for n in r.get("bench", {})})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(runs))
    for ax, metric in zip(axes, ("median_ttft_ms", "median_tpot_ms")):
        for i, (name, r) in enumerate(sorted(runs.items())):
            ys = [r.get("bench", {}).get(str(n), {}).get(metric) or 0 for n in lengths]
            ax.bar([j + i * width for j in range(len(lengths))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [str(n) for n in lengths])
        ax.set_xlabel("input tokens")
        ax.set_ylabel(metric.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vLLM {results.get('vllm')} dense vs + sparsekv plugin, and sparsekv serve "
                 f"({results['machine']['cpu']}, {results.get('dtype')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
