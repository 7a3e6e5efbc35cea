"""`sparsekv generate --input in.jsonl --output out.jsonl`: resumable offline batch generation.

Every finished result is appended and flushed at once, so a killed run loses nothing finished;
a rerun skips ids already in the output. A malformed line becomes an error record and the run
goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from sparsekv.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.init}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparsekv.cli import add_engine_arguments

    p.add_argument("--input", required=True, help="JSONL: {id, prompt | messages, ...sampling fields}")
    p.add_argument("--output", required=True, help="JSONL results, appended; existing ids are skipped")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens for lines without one")
    add_engine_arguments(p)


def done_ids(path: Path) -> set[str]:
    """Ids already finished in the output (error records are retried); a torn last line from
    a killed run is dropped."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    good = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            good.append(line)
            if "error" not in rec:
                ids.add(str(rec["id"]))
        except (ValueError, KeyError, TypeError):
            log.warning("dropping a torn line in %s", path)
    path.write_text("".join(g + "\n" for g in good))
    return ids


def record_id(line: str, lineno: int) -> str:
    """The line's id, or its line number when it has none (or is not JSON)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return f"line-{lineno}"
    return str(rec["id"]) if isinstance(rec, dict) and "id" in rec else f"line-{lineno}"


def parse_line(line: str, rid: str, default_max_tokens: int) -> dict[str, Any]:
    """The request of one line, or raises ValueError naming what is wrong."""
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{rid}: not JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{rid}: expected a JSON object")
    if ("prompt" in rec) == ("messages" in rec):
        raise ValueError(f"{rid}: give exactly one of 'prompt' or 'messages'")
    unknown = set(rec) - SAMPLING_FIELDS - {"id", "prompt", "messages", "sparsity"}
    if unknown:
        log.info("%s: ignoring unknown fields %s", rid, sorted(unknown))
    rec.setdefault("max_tokens", default_max_tokens)
    return rec


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparsekv.cli import engine_config_from_args
    from sparsekv.engine.llm import LLM

    out_path = Path(args.output)
    skip = done_ids(out_path)
    config = engine_config_from_args(args)
    llm = LLM(**config.model_dump(exclude={"sparsity"}), sparsity=config.sparsity)
    engine = llm.engine
    with out_path.open("a") as out:
        def emit(rec: dict) -> None:
            out.write(json.dumps(rec) + "\n")
            out.flush()

        pending = 0
        for lineno, line in enumerate(Path(args.input).read_text().splitlines(), 1):
            if not line.strip():
                continue
            rid = record_id(line, lineno)
            if rid in skip:
                continue
            try:
                rec = parse_line(line, rid, args.max_tokens)
                params = SamplingParams(**{k: v for k, v in rec.items() if k in SAMPLING_FIELDS})
                prompt = llm.render_chat(rec["messages"]) if "messages" in rec else rec["prompt"]
                engine.add_request(rid, prompt, params, rec.get("sparsity"))
                skip.add(rid)
                pending += 1
            except (ValueError, TypeError) as e:
                emit({"id": rid, "error": str(e)})
        with tqdm(total=pending, desc="generate", unit="req") as bar:
            while engine.has_unfinished_requests():
                for r in engine.step():
                    if r.finished:
                        o = r.outputs[0]
                        n_out = sum(len(c.token_ids) for c in r.outputs)
                        emit({"id": r.request_id, "text": o.text if len(r.outputs) == 1 else [c.text for c in r.outputs],
                              "finish_reason": o.finish_reason,
                              "usage": {"prompt_tokens": len(r.prompt_token_ids), "completion_tokens": n_out,
                                        "total_tokens": len(r.prompt_token_ids) + n_out,
                                        "sparsity": r.sparsity.as_dict()}})
                        bar.update(1)
    return 0
