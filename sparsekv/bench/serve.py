"""`sparsekv bench serve`: `vllm bench serve`'s method against any OpenAI-compatible endpoint.

Random prompts of exactly --input-len tokens stream through /v1/completions (ignore_eos,
max_tokens=--output-len, include_usage); arrivals are gamma-distributed (Poisson at burstiness
1). TTFT = first chunk, ITL = every later gap, TPOT = (latency - TTFT) / (tokens - 1). With no
--endpoint a sparsekv server is started on a free port with the engine flags, and stopped after.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparsekv.cli import add_engine_arguments

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--endpoint", default=None, help="base URL of a running server (default: start sparsekv serve)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--input-len", type=int, default=512)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--output", required=True, help="directory for results.json")


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """Texts that the tokenizer encodes (with its special tokens) to exactly `length` tokens."""
    rng = random.Random(seed)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    extra = len(tokenizer.encode("", add_special_tokens=True))
    prompts = []
    for _ in range(n):
        ids = rng.choices(vocab, k=length - extra)
        for _ in range(20):  # decode -> encode need not round-trip: fix the count and retry
            text = tokenizer.decode(ids)
            got = len(tokenizer.encode(text, add_special_tokens=True))
            if got == length:
                break
            ids = ids[:len(ids) - (got - length)] if got > length else ids + rng.choices(vocab, k=length - got)
        else:
            raise ValueError(f"could not build a prompt of exactly {length} tokens with this tokenizer")
        prompts.append(text)
    return prompts


async def send(client, url: str, model: str, prompt: str, output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res, chunks = RequestResult(), 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data, now = json.loads(line[6:]), time.perf_counter()
                if "error" in data:
                    res.error = data["error"].get("message", "error event")
                    return res
                if data.get("usage"):
                    res.prompt_len, res.output_len = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    chunks, last = chunks + 1, now
        res.latency, res.output_len = last - start, res.output_len or chunks
        res.ok = chunks > 0
    except Exception as e:  # a benchmark reports failures, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(args, base: str, model: str, prompts: list[str]) -> tuple[list[RequestResult], float]:
    import httpx

    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def limited(client, prompt: str) -> RequestResult:
        async with limit:
            return await send(client, f"{base}/v1/completions", model, prompt, args.output_len)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as client:
        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(client, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.gammavariate(args.burstiness, 1 / (args.request_rate * args.burstiness)))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    import numpy as np

    ok = [r for r in results if r.ok]
    ins, outs = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    series = {"ttft": [r.ttft for r in ok], "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok
                                                     if r.output_len > 1],
              "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    out = {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
           "total_input_tokens": ins, "total_output_tokens": outs,
           "request_throughput": len(ok) / duration, "output_throughput": outs / duration,
           "total_token_throughput": (ins + outs) / duration}
    for name, xs in series.items():
        ms = np.asarray(xs or [float("nan")]) * 1000
        out |= {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}
    return out


def print_summary(s: dict) -> None:
    print("{s:=^60}".format(s=" Serving Benchmark Result "))
    for key in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput"):
        print(f"{key:<40}{s[key]:>20.2f}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        print("{s:-^60}".format(s=f" {name.upper()} (ms) "))
        for stat in ("mean", "median", "p99"):
            print(f"{stat + ' ' + name.upper():<40}{s[f'{stat}_{name}_ms']:>20.2f}")
    print("=" * 60)


def _engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags the user changed, to hand on to the server this benchmark starts."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(probe)
    flags = []
    for action in probe._actions:
        value = getattr(args, action.dest, action.default)
        if action.option_strings and value != action.default:
            flags += [action.option_strings[0]] + ([] if action.nargs == 0 else [str(value)])
    return flags


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sparsekv.cli", "serve", "--port", str(port), *_engine_flags(args)]
    cmd += ["--api-key", args.api_key] if args.api_key else []
    logger.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 600 s")


def run(args: argparse.Namespace) -> int:
    import httpx

    from sparsekv.config import default_model
    from sparsekv.engine.loader import load_tokenizer

    if args.num_prompts < 1 or args.input_len < 2 or args.output_len < 1 or args.request_rate <= 0:
        raise ValueError("need --num-prompts >= 1, --input-len >= 2, --output-len >= 1, --request-rate > 0")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the summary
    tokenizer = load_tokenizer(args.model or default_model())
    prompts = random_prompts(tokenizer, args.num_prompts, args.input_len, args.seed)
    proc, base = (None, args.endpoint.rstrip("/")) if args.endpoint else _start_server(args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        results, duration = asyncio.run(run_load(args, base, model, prompts))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    summary = summarize(results, duration)
    config = {k: getattr(args, k) for k in ("num_prompts", "request_rate", "burstiness", "max_concurrency",
                                            "input_len", "output_len", "seed")}
    started = None if args.endpoint else ["sparsekv", "serve", *_engine_flags(args)]
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "endpoint": args.endpoint, "server_command": started,
              "model": model, **config, **summary,
              "errors": sorted({r.error for r in results if r.error}),
              "requests": [{k: v for k, v in asdict(r).items() if k != "itl"} for r in results]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(report), indent=2))
    print_summary(summary)
    print(f"results: {out / 'results.json'}")
    return 0 if summary["completed"] else 1


def _json_safe(value):
    """Strict JSON: inf (an unlimited request rate) as "inf", NaN (no samples) as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None if value != value else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
