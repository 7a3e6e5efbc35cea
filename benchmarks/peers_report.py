"""benchmarks/peers.py's results JSON (kept cell by cell), its figures and its markdown tables: one
PNG per (metric, concurrency), median over the prompts against input length, one line per variant."""
from __future__ import annotations

import json
import time
from pathlib import Path

from sparsekv.bench.serve import _json_safe

METRICS = {"ttft": "median TTFT (ms)", "tpot": "median TPOT (ms)", "output_throughput": "output tok/s"}


class Results:
    """The results JSON, rewritten whole (atomically) after every cell; failed cells, and cells
    measured with another prompt count or output length, are measured again."""

    def __init__(self, path: Path, meta: dict, shape: dict):
        self.path, self.shape = path, shape
        self.data = json.loads(path.read_text()) if path.exists() else {"peers": {}, "cells": {}}
        self.data.update(meta)

    def peer(self, name: str) -> dict:
        return self.data["peers"].setdefault(name, {})

    def done(self, k: str) -> bool:
        cell = self.data["cells"].get(k, {"error": None})
        return "error" not in cell and all(cell.get(f) == v for f, v in self.shape.items())

    def cell(self, k: str, measure) -> None:
        t = time.time()
        try:
            summary = measure()
            self.data["cells"][k] = {"wall_s": time.time() - t, **summary, **self.shape}  # offline: own wall_s
        except Exception as e:  # one failed cell is recorded, the run goes on
            self.data["cells"][k] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        got = self.data["cells"][k]
        print(f"{k}: {'error' if 'error' in got else 'done'} in {got.get('wall_s', time.time() - t):.0f} s", flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1))
        tmp.replace(self.path)


def series(data: dict, metric: str, conc: int) -> dict[str, list[tuple[int, float]]]:
    """variant -> [(input length, value)] over its finished cells at this concurrency."""
    out: dict[str, list[tuple[int, float]]] = {}
    for k, cell in data["cells"].items():
        name, length, *c = k.split("|")
        field = metric if metric == "output_throughput" else f"median_{metric}_ms"
        if c == [f"c{conc}"] and cell.get(field) is not None:
            out.setdefault(name, []).append((int(length), cell[field]))
    return {n: sorted(xs) for n, xs in sorted(out.items())}


def concurrencies(data: dict) -> list[int]:
    return sorted({int(k.split("|")[2][1:]) for k in data["cells"] if k.count("|") == 2})


def plot(data: dict, metric: str, conc: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xs in series(data, metric, conc).items():
        style = "-" if name.startswith("sparsekv") else "--"
        ax.plot([x for x, _ in xs], [y for _, y in xs], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input tokens")
    ax.set_ylabel(METRICS[metric])
    ax.set_title(f"{METRICS[metric]}, concurrency {conc} ({data.get('cpu', {}).get('model', 'CPU')})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def version(info: dict) -> str:
    if "setup_error" in info:
        return "setup failed: " + info["setup_error"].splitlines()[0][:80]
    return ", ".join(f"{p} {v}" for p, v in (info.get("versions") or {}).items() if v and p != "error")


def table(data: dict, conc: int) -> list[str]:
    """TTFT / TPOT (ms) per input length at one concurrency; '-' where a cell is missing or failed."""
    lengths = sorted({int(k.split("|")[1]) for k in data["cells"] if k.count("|") == 2})
    ttft, tpot = (dict(series(data, m, conc)) for m in ("ttft", "tpot"))
    head = "| variant | precision | version | " + " | ".join(f"{label(n)} TTFT / TPOT" for n in lengths) + " |"
    lines = [f"Concurrency {conc}: median TTFT / TPOT in ms", "", head, "|---" * (3 + len(lengths)) + "|"]
    for name, info in data["peers"].items():
        a, b = dict(ttft.get(name, [])), dict(tpot.get(name, []))
        vals = [f"{a[n]:.0f} / {b[n]:.1f}" if n in a and n in b else "-" for n in lengths]
        lines.append(f"| {name} | {info.get('precision', '')} | {version(info)} | " + " | ".join(vals) + " |")
    return lines


def eval_table(data: dict) -> list[str]:
    rows = {k.split("|")[0]: c["rows"] for k, c in data["cells"].items() if k.endswith("|eval") and "rows" in c}
    cols = sorted({(r["task"], r["length"]) for rs in rows.values() for r in rs})
    if not cols:
        return []
    lines = ["Eval score (`sparsekv eval --endpoint`)", "",
             "| variant | " + " | ".join(f"{t} {label(n)}" for t, n in cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for name, rs in rows.items():
        got = {(r["task"], r["length"]): r["score"] for r in rs}
        lines.append(f"| {name} | " + " | ".join(f"{got[c]:.1f}" if c in got else "-" for c in cols) + " |")
    return lines


def write(data: dict, stem: Path) -> list[Path]:
    """stem-METRIC-cN.png per figure and stem.md (the tables, with the CPU); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [plot(data, m, c, stem.with_name(f"{stem.name}-{m}-c{c}.png"))
             for c in concurrencies(data) for m in METRICS if series(data, m, c)]
    cpu = data.get("cpu", {})
    lines = [f"CPU: {cpu.get('model')}, {cpu.get('cores')} cores, {' '.join(cpu.get('isa', []))}; "
             f"model {Path(data.get('model', '')).name}", ""]
    for c in concurrencies(data):
        lines += table(data, c) + [""]
    lines += eval_table(data)
    failed = [f"- {name}: {info.get('setup_error') or info['run_error']}" for name, info in data["peers"].items()
              if "setup_error" in info or "run_error" in info]
    lines += ["", "Could not be set up or run:", "", *failed] if failed else []
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [*paths, md]
