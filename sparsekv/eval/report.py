"""Aggregates sample records into rows and writes results.json, report.md and the figures."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

from sparsekv.eval import plots
from sparsekv.eval.plots import unique

NOTES = """\
Scores are RULER's string match in [0, 100]: the share of reference strings found in the output
(case-insensitive), averaged over samples; a failed sample scores 0 and is counted in
`n_failed`. Prompts are exactly `length` tokens long (BOS included) as the model's tokenizer
counts them (a few tokens short only if no pad word fits; samples.jsonl has `prompt_tokens`).
Task wording is RULER's with small changes: a pass-key task, a varied
template-sentence haystack in place of Paul Graham essays, a variable-tracking answer prefix
saying "chain(s) of variable assignment", and CWE/FWE frequencies that grow with the length.
Needle tasks put the (first) queried needle at the sample's depth (0 = start of the context,
1 = end), cycling through the depths; the other needles sit at seeded random places.
`attended_fraction` is the mean prefill fraction of causal (query, key) pairs attended.
Prefill and decode seconds are per-request wall times while batched with others (in-process:
up to `--batch-size` requests in flight; endpoint: time to the first streamed token and the
rest, `--concurrency` requests in flight), so compare them between methods of one run. With
`--chat` (results.json "chat") each prompt is the model's chat template around the question,
the answer prefix opening the reply; lengths count the template's tokens."""


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return mean(vals) if vals else None


def by_cell(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (task, length, method), in the order they come."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["length"], r["method"]), []).append(r)
    return groups


def build_rows(records: list[dict]) -> list[dict]:
    """One row per (task, length, method), in the order the records come."""
    rows = []
    for (task, length, method), recs in by_cell(records).items():
        ok = [r for r in recs if r["error"] is None]
        row: dict[str, Any] = {
            "task": task, "length": length, "method": method,
            "score": mean(r["score"] for r in recs), "n": len(recs), "n_failed": len(recs) - len(ok),
            "attended_fraction": _mean(r["prefill_attended_fraction"] for r in ok),
            "decode_attended_fraction": _mean(r["decode_attended_fraction"] for r in ok),
            "kv_bytes_fraction": _mean(r["kv_bytes_fraction"] for r in ok),
            "prefill_seconds": _mean(r["prefill_seconds"] for r in ok),
            "decode_seconds": _mean(r["decode_seconds"] for r in ok),
        }
        depths = sorted({r["depth"] for r in recs if r["depth"] is not None})
        if depths:
            row["by_depth"] = {str(d): mean(r["score"] for r in recs if r["depth"] == d) for d in depths}
        rows.append(row)
    return rows


def _fmt(v: float | None, signed: bool = False, digits: int = 1) -> str:
    return "-" if v is None else f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _table(rows: list[dict], method: str, base: str | None = None) -> list[str]:
    """Task x length scores of `method` (minus `base`'s when given), with a mean row."""
    lengths = unique(r["length"] for r in rows)
    cell = {(r["task"], r["length"], r["method"]): r["score"] for r in rows}

    def value(task: str, length: int) -> float | None:
        v, b = cell.get((task, length, method)), cell.get((task, length, base)) if base else 0.0
        return None if v is None or b is None else v - b
    lines = ["| task | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    tasks = unique(r["task"] for r in rows)
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_fmt(value(task, n), bool(base)) for n in lengths) + " |")
    means = [_mean(value(t, n) for t in tasks) for n in lengths]
    lines.append("| **mean** | " + " | ".join(_fmt(m, bool(base)) for m in means) + " |")
    return lines


def _stats_table(rows: list[dict]) -> list[str]:
    lines = ["| method | length | prefill attended | decode attended | KV bytes | prefill s | decode s | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for method in unique(r["method"] for r in rows):
        for length in unique(r["length"] for r in rows):
            sel = [r for r in rows if r["method"] == method and r["length"] == length]
            lines.append(f"| {method} | {length} | " + " | ".join(
                _fmt(_mean(r[k] for r in sel), digits=d) for k, d in
                (("attended_fraction", 3), ("decode_attended_fraction", 3), ("kv_bytes_fraction", 3),
                 ("prefill_seconds", 3), ("decode_seconds", 3))) + f" | {sum(r['n_failed'] for r in sel)} |")
    return lines


AGREEMENT_NOTES = """\
Dense generates greedily; each method is then teacher-forced on dense's tokens (every forced
token through a real decode step of the method). top-1: the share of those steps where the
method's argmax equals dense's token; first token: the share of prompts whose first answer
token agrees (it comes from the prefill). Attention error: per layer ||A - A_dense|| / ||A_dense||
of the attention output (the input of o_proj), averaged over layers, over prompt rows (prefill)
and forced rows (decode); it compounds the differences of earlier layers. Block recall (prefill
methods): on dense's Q/K of a few layers, the share of dense block attention mass inside the
selected blocks, and the share of the true top-n blocks selected (n = blocks selected per row)."""


def _agreement_table(rows: list[dict]) -> list[str]:
    lines = ["| method | task | length | n | top-1 | first token | attn err prefill | attn err decode | "
             "block mass recall | block top-n recall |", "|---" * 10 + "|"]
    for r in rows:
        rec = list((r.get("block_recall") or {}).values())
        lines.append(f"| {r['method']} | {r['task']} | {r['length']} | {r['n']} | {_fmt(100 * r['top1_agreement'])} | "
                     f"{_fmt(100 * r['first_token_agreement'])} | {_fmt(r.get('prefill_rel_error'), digits=4)} | "
                     f"{_fmt(r.get('decode_rel_error'), digits=4)} | "
                     f"{_fmt(_mean(x['mass_recall'] for x in rec), digits=3)} | "
                     f"{_fmt(_mean(x['topk_recall'] for x in rec), digits=3)} |")
    return lines


def markdown(model: str, rows: list[dict], figures: list[str], agreement: list[dict] | None = None) -> str:
    methods = unique(r["method"] for r in rows)
    n = unique(r["n"] for r in rows)
    out = [f"# Long-context eval: {model}", "", f"Samples per cell: {', '.join(map(str, n))}.", "", NOTES, ""]
    for m in methods:
        out += [f"## Scores: {m}", "", *_table(rows, m), ""]
    if "dense" in methods:
        for m in methods:
            if m != "dense":
                out += [f"## {m} minus dense", "", *_table(rows, m, base="dense"), ""]
    out += ["## Attended fraction, KV bytes and time (means over tasks and samples)", "", *_stats_table(rows), ""]
    if agreement:
        out += ["## Agreement with dense", "", AGREEMENT_NOTES, "", *_agreement_table(agreement), ""]
    out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(out) + "\n"


def write(out: Path, model: str, rows: list[dict], meta: dict | None = None,
          agreement: list[dict] | None = None) -> list[Path]:
    """DIR/results.json, DIR/report.md and the PNGs; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    extra = {"agreement": agreement} if agreement else {}
    results.write_text(json.dumps({"model": model, **(meta or {}), "rows": rows, **extra}, indent=1) + "\n")
    figures = plots.draw_all(out, rows)
    if agreement:
        figures.append(plots.error_by_layer(agreement, out / "attention_error_by_layer.png"))
    report = out / "report.md"
    report.write_text(markdown(model, rows, [f.name for f in figures], agreement))
    return [results, report, *figures]
