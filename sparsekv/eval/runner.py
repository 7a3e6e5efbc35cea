"""Runs eval samples per method and caches each finished sample as one JSONL line.

The cache (DIR/samples.jsonl) is appended and flushed sample by sample, so an interrupted run
resumes where it stopped. A line counts as done only when its fingerprint (model name, prompt,
method config, max_tokens) matches, so changing the seed, model or preset reruns what changed. A
failed sample is recorded with its error (score 0) and retried on the next run.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import httpx
from tqdm.auto import tqdm

from sparsekv.config import SparsityConfig
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.engine.sequence import prefill_salt
from sparsekv.eval.scoring import score
from sparsekv.eval.tasks import Sample

log = logging.getLogger(__name__)

_ids = itertools.count()
Key = tuple[str, int, str, int, "float | None"]  # task, length, method, index, depth


@dataclass
class Result:
    """What one generation gave back; stats are None where the engine or server did not say."""

    text: str = ""
    error: str | None = None
    prompt_tokens: int | None = None
    prefill_attended_fraction: float | None = None
    decode_attended_fraction: float | None = None
    kv_bytes_fraction: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None


STAT_FIELDS = ("prefill_attended_fraction", "decode_attended_fraction", "kv_bytes_fraction")
Done = Callable[[Sample, Result], None]


class Runner(Protocol):
    model_name: str

    def run(self, samples: list[Sample], method: str, sparsity: SparsityConfig, done: Done) -> None:
        """Generate every sample, calling done(sample, result) as each finishes (failures included)."""


def key(sample: Sample, method: str) -> Key:
    return (sample.task, sample.length, method, sample.index, sample.depth)


def fingerprint(sample: Sample, sparsity: SparsityConfig, model: str) -> str:
    blob = json.dumps([model, sample.prompt, sample.max_tokens, sparsity.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class Store:
    """DIR/samples.jsonl: the last line for a key wins; a torn last line (a kill mid-write) is skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[Key, dict] = {}
        text = path.read_text() if path.exists() else ""
        self.torn = bool(text) and not text.endswith("\n")  # start the next record on a line of its own
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a damaged line in %s", path)
                continue
            self.records[self._key(rec)] = rec

    @staticmethod
    def _key(rec: dict) -> Key:
        return (rec["task"], rec["length"], rec["method"], rec["index"], rec["depth"])

    def finished(self, k: Key, fp: str) -> bool:
        rec = self.records.get(k)
        return rec is not None and rec["fingerprint"] == fp and rec["error"] is None

    def add(self, rec: dict) -> None:
        self.records[self._key(rec)] = rec
        with self.path.open("a") as f:
            f.write(("\n" if self.torn else "") + json.dumps(rec) + "\n")
            self.torn = False
            f.flush()


def record(sample: Sample, method: str, fp: str, result: Result) -> dict:
    failed = result.error is not None
    return {"task": sample.task, "length": sample.length, "method": method, "index": sample.index,
            "depth": sample.depth, "fingerprint": fp, "references": list(sample.references),
            "score": 0.0 if failed else score(sample.metric, result.text, sample.references), **asdict(result)}


def evaluate(runner: Runner, samples: list[Sample], methods: dict[str, SparsityConfig], store: Store,
             progress: bool = True, chunk: int = 16) -> list[dict]:
    """Every (sample, method) not already finished in the store; returns the records of all of them.
    Samples go `chunk` at a time through every method before the next chunk, methods that prefill
    alike next to each other: the chunk's prompts are still in the prefix cache when a decode-side
    method follows dense, so it reuses dense's prompt pages (same K/V) instead of recomputing them
    (a sparse prefill in between would have pushed them out), and a cut-short run leaves whole cells."""
    salts = [prefill_salt(cfg) for cfg in methods.values()]
    order = sorted(methods, key=lambda m: salts.index(prefill_salt(methods[m])))
    todo = {m: [s for s in samples if not store.finished(key(s, m), fingerprint(s, cfg, runner.model_name))]
            for m, cfg in methods.items()}
    total = sum(len(v) for v in todo.values())
    skipped = len(samples) * len(methods) - total
    if skipped:
        log.info("resuming: %d of %d samples already done", skipped, len(samples) * len(methods))
    with tqdm(total=total, desc="eval", unit="sample", disable=not progress) as bar:
        for start in range(0, len(samples), chunk):
            part = {id(s) for s in samples[start:start + chunk]}
            for method in order:
                cfg = methods[method]
                pending = [s for s in todo[method] if id(s) in part]
                bar.set_postfix_str(method)

                def done(sample: Sample, result: Result, method: str = method, cfg: SparsityConfig = cfg) -> None:
                    if result.error:
                        log.warning("%s %s@%d #%d failed: %s", method, sample.task, sample.length, sample.index,
                                    result.error)
                    store.add(record(sample, method, fingerprint(sample, cfg, runner.model_name), result))
                    bar.update(1)
                if pending:
                    runner.run(pending, method, cfg, done)
    return [store.records[key(s, m)] for m in methods for s in samples]


class LocalRunner:
    """The engine in this process, built on first use (a fully cached run never loads the
    model). Up to `batch_size` samples are in flight; the step loop is driven here, so each
    sample is reported (and the progress bar moves) the moment it finishes, and a finished one
    is replaced at once (continuous batching, as a server would)."""

    def __init__(self, make_llm: Callable[[], Any], model_name: str, batch_size: int = 8):
        self.make_llm, self.model_name, self.batch_size = make_llm, model_name, batch_size
        self.llm: Any = None
        self.warm: set[str] = set()

    def run(self, samples: list[Sample], method: str, sparsity: SparsityConfig, done: Done) -> None:
        self.llm = self.llm or self.make_llm()
        # "dense" runs the engine's own config, as EndpointRunner sends none: under server-wide
        # settings (e.g. --kv-prune mustafar) a full dense config would be refused as a change
        sparsity = None if method == "dense" else sparsity
        if method not in self.warm:  # warm-up (lazy init, kernel compilation) outside the timed samples
            self.warm.add(method)
            try:  # errors show up in the samples below
                self.llm.generate([samples[0].prompt], SamplingParams(temperature=0.0, max_tokens=2),
                                  sparsity=sparsity, use_tqdm=False)
            except Exception:  # noqa: BLE001
                self._abort_all()
        self._window(samples, sparsity, done, self.batch_size)

    def _window(self, samples: list[Sample], sparsity: SparsityConfig | None, done: Done, width: int) -> None:
        engine = self.llm.engine
        queue, flight = list(samples)[::-1], {}
        while queue or flight:
            while queue and len(flight) < width:
                s = queue.pop()
                rid = f"eval-{next(_ids)}"
                try:
                    engine.add_request(rid, s.prompt, SamplingParams(temperature=0.0, max_tokens=s.max_tokens),
                                       sparsity)
                except ValueError as e:  # too long, bad config: this sample only
                    done(s, Result(error=f"ValueError: {e}"))
                    continue
                flight[rid] = s
            try:
                outs = engine.step()
            except Exception as e:  # noqa: BLE001 - a failing prompt must not sink the run
                self._abort_all()
                if len(flight) == 1:
                    done(next(iter(flight.values())), Result(error=f"{type(e).__name__}: {e}"))
                else:
                    log.warning("a step failed (%s); running its %d samples one by one", e, len(flight))
                    for s in flight.values():
                        self._window([s], sparsity, done, 1)
                flight = {}
                continue
            for out in outs:
                if out.finished and out.request_id in flight:
                    s = flight.pop(out.request_id)
                    stats = out.sparsity.as_dict()
                    done(s, Result(text=out.outputs[0].text, prompt_tokens=len(out.prompt_token_ids),
                                   prefill_seconds=out.metrics.prefill_seconds,
                                   decode_seconds=out.metrics.decode_seconds,
                                   **{f: stats.get(f) for f in STAT_FIELDS}))

    def _abort_all(self) -> None:
        """Drop what a failed step left queued in the engine."""
        for rid in list(self.llm.engine.requests):
            self.llm.engine.abort_request(rid)


class EndpointRunner:
    """Any OpenAI-compatible server through POST /v1/completions, streamed so that prefill
    (time to the first token) and decode times can be told apart. Sparse methods send their
    SparsityConfig as the extra body field "sparsity" (which sparsekv servers accept); "dense"
    sends none, so it works against any server. A sparsekv server keys its prefix cache by the
    prefill-side sparsity config, so methods never reuse each other's sparse prefill."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 4, api_key: str | None = None,
                 timeout: float = 3600.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency, self.timeout = concurrency, timeout
        self.model_name = model or self._first_model()

    def _first_model(self) -> str:
        r = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def count_tokens(self, text: str) -> int:
        """Prompt tokens as the server counts them (POST /tokenize)."""
        r = httpx.post(f"{self.url}/tokenize", json={"model": self.model_name, "prompt": text},
                       headers=self.headers, timeout=120)
        r.raise_for_status()
        return int(r.json()["count"])

    def run(self, samples: list[Sample], method: str, sparsity: SparsityConfig, done: Done) -> None:
        extra = {} if method == "dense" else {"sparsity": sparsity.model_dump(mode="json")}
        asyncio.run(self._run_all(samples, extra, done))

    async def _run_all(self, samples: list[Sample], extra: dict, done: Done) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            async def one(sample: Sample) -> None:
                async with sem:
                    try:
                        result = await self._complete(client, sample, extra)
                    except Exception as e:  # noqa: BLE001 - recorded as failed, never dropped
                        result = Result(error=f"{type(e).__name__}: {e}")
                done(sample, result)
            await asyncio.gather(*(one(s) for s in samples))

    async def _complete(self, client: httpx.AsyncClient, sample: Sample, extra: dict) -> Result:
        body = {"model": self.model_name, "prompt": sample.prompt, "max_tokens": sample.max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, **extra}
        start, first, text, usage = time.perf_counter(), None, [], {}
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        first = first or time.perf_counter()
                        text.append(choice["text"])
                usage = chunk.get("usage") or usage
        end = time.perf_counter()
        stats = usage.get("sparsity") or {}
        return Result(text="".join(text), prompt_tokens=usage.get("prompt_tokens"),
                      prefill_seconds=(first or end) - start, decode_seconds=end - (first or end),
                      **{f: stats.get(f) for f in STAT_FIELDS})
