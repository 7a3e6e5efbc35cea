"""`sparsekv eval`: RULER-style long-context eval of dense vs sparse methods, in-process or
against an OpenAI-compatible endpoint. Writes DIR/samples.jsonl (resumable), results.json,
report.md and PNGs."""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    e.add_argument("--lengths", type=_csv(int), default=None,
                   help="prompt lengths in tokens (default: RULER's 4K, 8K, ... up to the model's context); one "
                        "within the context but too long for the answer is clipped, one beyond it skipped unless a "
                        "rope scaling override allows it")
    e.add_argument("--methods", type=_csv(str), default="dense", help="method presets or SparsityConfig JSON paths")
    e.add_argument("--samples", type=int, default=10, help="samples per task and length")
    e.add_argument("--depths", type=_csv(float), default=DEFAULT_DEPTHS,
                   help="needle depths (0 = start, 1 = end); needle-task samples cycle through them")
    e.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: RULER's per task)")
    e.add_argument("--concurrency", type=int, default=4, help="parallel requests with --endpoint")
    e.add_argument("--batch-size", type=int, default=8,
                   help="requests in flight in-process (continuous batching: fewer gives the first result sooner)")
    e.add_argument("--tokenize-with", choices=["local", "server"], default="local",
                   help="with --endpoint: count tokens with the local tokenizer of --model or the server's /tokenize")
    e.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template (question as the user turn, answer prefix "
                        "opening the reply); the same format for every method")
    e.add_argument("--agreement", action="store_true",
                   help="also measure agreement with dense on the same prompts (in-process only): top-1 token "
                        "agreement teacher-forced on dense's output, per-layer attention output error, block recall")
    e.add_argument("--agreement-layers", type=_csv(int), default=None,
                   help="layers whose Q/K give the block recall of prefill methods (default: two sparse middle layers)")
    e.add_argument("--output", required=True, type=Path, help="output directory")
    add_engine_arguments(p)  # --seed also seeds the task generator


def _local_tokenizer(model: str):
    from sparsekv.engine.loader import load_tokenizer

    return load_tokenizer(model)


def _grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(task, length) cells that fit the model (see eval/lengths.py); with --endpoint and no local
    --model the lengths are taken as asked."""
    from sparsekv.config import default_model
    from sparsekv.eval.lengths import cells, model_max_len, rope_override
    from sparsekv.eval.tasks import TASKS

    budgets = {t: args.max_tokens or TASKS[t].max_tokens for t in args.tasks}
    if args.endpoint and not args.model:
        return [(t, n) for t in args.tasks for n in args.lengths or (4096, 8192)]
    overrides = args.hf_overrides
    limit = model_max_len(args.model or default_model(), overrides)
    grid = cells(args.tasks, args.lengths, budgets, limit, rope_override(overrides))
    if not grid:
        raise ValueError(f"no asked-for length fits the model's {limit}-token context")
    return grid


def _samples(args: argparse.Namespace, count, fmt) -> list:
    from tqdm.auto import tqdm

    from sparsekv.eval.tasks import generate

    grid = [(t, n, i) for t, n in _grid(args) for i in range(args.samples)]
    out = []
    for task, length, index in tqdm(grid, desc="prompts", unit="prompt"):
        s = generate(task, length, index, count, seed=args.seed, depths=args.depths, fmt=fmt)
        out.append(dataclasses.replace(s, max_tokens=args.max_tokens) if args.max_tokens else s)
    short = [s for s in out if s.prompt_tokens != s.length]
    if short:
        log.warning("%d prompts could not be padded to their exact length (at most %d tokens short)",
                    len(short), max(s.length - s.prompt_tokens for s in short))
    return out


def _engine_config(args: argparse.Namespace, samples: list):
    cfg = engine_config_from_args(args)
    need = max(s.length + s.max_tokens for s in samples) + 16
    return cfg.model_copy(update={"max_model_len": max(cfg.max_model_len or 0, need)})


def _runner(args: argparse.Namespace, samples: list):
    from sparsekv.eval.runner import EndpointRunner, LocalRunner

    if args.endpoint:
        return EndpointRunner(args.endpoint, args.served_model_name, args.concurrency, args.api_key)
    # the prefix cache is keyed by the prefill-side sparsity too: decode-only methods reuse the
    # dense prefill of the same prompt (identical K/V), prefill methods compute their own
    cfg = _engine_config(args, samples)

    def make_llm():
        from sparsekv import LLM

        return LLM(**cfg.model_dump())
    return LocalRunner(make_llm, cfg.served_model_name or Path(cfg.model).name, args.batch_size)


def _agreement(args: argparse.Namespace, samples: list, methods: dict) -> list[dict]:
    """Agreement records on the eval's own prompts, from an engine of its own: one sequence at a
    time and no prefix cache, so every run computes (and the hooks see) the whole prompt."""
    from tqdm.auto import tqdm

    from sparsekv import LLM
    from sparsekv.eval.agreement import agreement, default_layers

    cfg = _engine_config(args, samples).model_copy(update={"enable_prefix_caching": False, "max_num_seqs": 1})
    llm = LLM(**cfg.model_dump())
    layers = tuple(args.agreement_layers or default_layers(llm.engine.runner.model.args.num_layers, methods))
    total = len(samples) * sum(m != "dense" for m in methods)
    with tqdm(total=total, desc="agreement", unit="sample") as bar:
        records = agreement(llm, samples, methods, layers, bar)
    with (args.output / "agreement.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def run(args: argparse.Namespace) -> int:
    from sparsekv.config import default_model, preset
    from sparsekv.eval import report
    from sparsekv.eval.runner import Store, evaluate
    from sparsekv.eval.tasks import TASKS, chat_format, plain

    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if args.samples < 1 or args.lengths == [] or not args.methods:
        raise ValueError("need --samples >= 1 and at least one length and method")
    methods = {m: preset(m) for m in args.methods}
    args.output.mkdir(parents=True, exist_ok=True)
    if args.agreement and args.endpoint:
        raise ValueError("--agreement runs in-process (it hooks the model's layers); drop --endpoint")
    if args.endpoint and args.tokenize_with == "server":
        if args.chat:
            raise ValueError("--chat needs the local tokenizer's chat template; use --tokenize-with local")
        runner = _runner(args, [])
        samples = _samples(args, runner.count_tokens, plain)
    else:
        tok = _local_tokenizer(args.model or default_model())
        samples = _samples(args, lambda text: len(tok.encode(text)), chat_format(tok) if args.chat else plain)
        runner = _runner(args, samples)
    records = evaluate(runner, samples, methods, Store(args.output / "samples.jsonl"), chunk=2 * args.batch_size)
    rows = report.build_rows(records)
    agreement_rows = None
    if args.agreement:
        from sparsekv.eval.agreement import summarize

        agreement_rows = summarize(_agreement(args, samples, methods))
    meta = {"endpoint": args.endpoint, "seed": args.seed, "samples": args.samples, "depths": args.depths,
            "max_tokens": args.max_tokens, "chat": args.chat}
    paths = report.write(args.output, runner.model_name, rows, meta, agreement_rows)
    failed = sum(r["n_failed"] for r in rows)
    if failed:
        log.warning("%d of %d samples failed (scored 0); see %s", failed, len(records), args.output / "samples.jsonl")
    print("\n".join(str(p) for p in paths))
    return 1 if failed == len(records) else 0
