"""`sparsekv eval`: RULER-style long-context eval of dense vs sparse methods, in-process or
against an OpenAI-compatible endpoint. Writes DIR/samples.jsonl (resumable), results.json,
report.md and PNGs."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from sparsekv.cli import add_engine_arguments, engine_config_from_args

log = logging.getLogger(__name__)
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("eval")
    e.add_argument("--endpoint", default=None, help="OpenAI-compatible server URL instead of the in-process engine")
    e.add_argument("--served-model-name", default=None, help="model name to send (default: the server's first)")
    e.add_argument("--api-key", default=None)
    e.add_argument("--tasks", type=_csv(str), default="niah_single,niah_multikey,vt",
                   help="comma-separated: passkey, niah_single, niah_single_varied, niah_multikey, niah_multikey_kv, "
                        "niah_multivalue, niah_multiquery, vt, cwe, fwe")
    e.add_argument("--lengths", type=_csv(int), default="4096,8192", help="prompt lengths in tokens")
    e.add_argument("--methods", type=_csv(str), default="dense", help="method presets or SparsityConfig JSON paths")
    e.add_argument("--samples", type=int, default=10, help="samples per task and length")
    e.add_argument("--depths", type=_csv(float), default=DEFAULT_DEPTHS,
                   help="needle depths (0 = start, 1 = end); needle-task samples cycle through them")
    e.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: RULER's per task)")
    e.add_argument("--concurrency", type=int, default=4, help="parallel requests with --endpoint")
    e.add_argument("--batch-size", type=int, default=16, help="prompts per generate call in-process")
    e.add_argument("--tokenize-with", choices=["local", "server"], default="local",
                   help="with --endpoint: count tokens with the local tokenizer of --model or the server's /tokenize")
    e.add_argument("--output", required=True, type=Path, help="output directory")
    add_engine_arguments(p)  # --seed also seeds the task generator


def _local_counter(model_dir: str):
    from sparsekv.engine.loader import load_tokenizer

    tok = load_tokenizer(model_dir)
    return lambda text: len(tok.encode(text))


def _samples(args: argparse.Namespace, count) -> list:
    from tqdm.auto import tqdm

    from sparsekv.eval.tasks import generate

    grid = [(t, n, i) for t in args.tasks for n in args.lengths for i in range(args.samples)]
    out = []
    for task, length, index in tqdm(grid, desc="prompts", unit="prompt"):
        s = generate(task, length, index, count, seed=args.seed, depths=args.depths)
        out.append(dataclasses.replace(s, max_tokens=args.max_tokens) if args.max_tokens else s)
    short = [s for s in out if s.prompt_tokens != s.length]
    if short:
        log.warning("%d prompts could not be padded to their exact length (at most %d tokens short)",
                    len(short), max(s.length - s.prompt_tokens for s in short))
    return out


def _runner(args: argparse.Namespace, samples: list):
    from sparsekv.eval.runner import EndpointRunner, LocalRunner

    if args.endpoint:
        return EndpointRunner(args.endpoint, args.served_model_name, args.concurrency, args.api_key)
    cfg = engine_config_from_args(args)
    need = max(s.length + s.max_tokens for s in samples) + 16
    # the prefix cache is keyed by the prefill-side sparsity too: decode-only methods reuse the
    # dense prefill of the same prompt (identical K/V), prefill methods compute their own
    cfg = cfg.model_copy(update={"max_model_len": max(cfg.max_model_len or 0, need)})

    def make_llm():
        from sparsekv import LLM

        return LLM(**cfg.model_dump())
    return LocalRunner(make_llm, cfg.served_model_name or Path(cfg.model).name, args.batch_size)


def run(args: argparse.Namespace) -> int:
    from sparsekv.config import default_model, preset
    from sparsekv.eval import report
    from sparsekv.eval.runner import Store, evaluate
    from sparsekv.eval.tasks import TASKS

    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if args.samples < 1 or not args.lengths or not args.methods:
        raise ValueError("need --samples >= 1 and at least one length and method")
    methods = {m: preset(m) for m in args.methods}
    args.output.mkdir(parents=True, exist_ok=True)
    if args.endpoint and args.tokenize_with == "server":
        runner = _runner(args, [])
        samples = _samples(args, runner.count_tokens)
    else:
        samples = _samples(args, _local_counter(args.model or default_model()))
        runner = _runner(args, samples)
    records = evaluate(runner, samples, methods, Store(args.output / "samples.jsonl"))
    rows = report.build_rows(records)
    meta = {"endpoint": args.endpoint, "seed": args.seed, "samples": args.samples, "depths": args.depths,
            "max_tokens": args.max_tokens}
    paths = report.write(args.output, runner.model_name, rows, meta)
    failed = sum(r["n_failed"] for r in rows)
    if failed:
        log.warning("%d of %d samples failed (scored 0); see %s", failed, len(records), args.output / "samples.jsonl")
    print("\n".join(str(p) for p in paths))
    return 1 if failed == len(records) else 0
