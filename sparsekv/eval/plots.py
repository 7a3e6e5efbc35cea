"""The eval figures (matplotlib, Agg): score vs length, needle heatmaps, score vs attended fraction."""
from __future__ import annotations

import re
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def unique(values) -> list:
    """The distinct values in first-seen order (rows keep the order tasks and lengths were asked in)."""
    return list(dict.fromkeys(values))


def slug(method: str) -> str:
    """A file-name-safe name for a method (a preset may be a path to a JSON file)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(method).stem if method.endswith(".json") else method)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_vs_length(rows: list[dict], path: Path) -> Path:
    """One panel per task (and the mean over tasks), one line per method."""
    tasks = unique(r["task"] for r in rows)
    panels = tasks + (["mean"] if len(tasks) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    lengths = sorted(unique(r["length"] for r in rows))
    for ax, task in zip(axes[0], panels):
        for method in unique(r["method"] for r in rows):
            ys = [mean([r["score"] for r in rows if r["method"] == method and r["length"] == n
                        and task in ("mean", r["task"])] or [float("nan")]) for n in lengths]
            ax.plot(lengths, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def needle_heatmap(rows: list[dict], method: str, path: Path) -> Path | None:
    """Length x depth grid of one method, one panel per needle task (green found, red missed)."""
    sel = [r for r in rows if r["method"] == method and r.get("by_depth")]
    tasks = unique(r["task"] for r in sel)
    if not tasks:
        return None
    lengths = sorted(unique(r["length"] for r in sel))
    depths = sorted({float(d) for r in sel for d in r["by_depth"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.9 * len(lengths) * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cell = {(r["length"], float(d)): s for r in sel if r["task"] == task for d, s in r["by_depth"].items()}
        grid = [[cell.get((n, d), float("nan")) for n in lengths] for d in depths]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for y, line in enumerate(grid):
            for x, v in enumerate(line):
                if v == v:  # not NaN
                    ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_title(f"{task} ({method})", fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def score_vs_attended(rows: list[dict], path: Path) -> Path:
    """Pareto view: mean score over tasks against the attended fraction, per method and length."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, phase in zip(axes, ("attended_fraction", "decode_attended_fraction"), ("prefill", "decode")):
        for method in unique(r["method"] for r in rows):
            pts = []
            for n in sorted(unique(r["length"] for r in rows)):
                sel = [r for r in rows if r["method"] == method and r["length"] == n and r[key] is not None]
                if sel:
                    pts.append((mean(r[key] for r in sel), mean(r["score"] for r in sel), n))
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
                for x, y, n in pts:
                    ax.annotate(f"{n // 1024}K" if n >= 1024 else str(n), (x, y), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{phase} attended fraction")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean score over tasks")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def error_by_layer(agreement: list[dict], path: Path) -> Path:
    """Relative attention-output error against dense per layer, one line per (method, length)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for method in unique(r["method"] for r in agreement):
            for n in sorted(unique(r["length"] for r in agreement)):
                curves = [r[f"{phase}_rel_error_by_layer"] for r in agreement
                          if r["method"] == method and r["length"] == n and f"{phase}_rel_error_by_layer" in r]
                if curves:
                    ax.plot([mean(v) for v in zip(*curves)], marker=".", label=f"{method} {n}")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("layer")
        ax.set_title(f"{phase} rows")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||A - A_dense|| / ||A_dense||")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def draw_all(out: Path, rows: list[dict]) -> list[Path]:
    figs = [score_vs_length(rows, out / "score_vs_length.png"), score_vs_attended(rows, out / "score_vs_attended.png")]
    for method in unique(r["method"] for r in rows):
        fig = needle_heatmap(rows, method, out / f"needle_heatmap_{slug(method)}.png")
        if fig:
            figs.append(fig)
    return figs
