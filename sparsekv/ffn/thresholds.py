"""Calibrated activation thresholds: the file `sparsekv calibrate` writes and the engine reads.

A table holds, per layer and per site, the quantiles of one activation score at fixed sparsity
levels; the threshold for a sparsity s is interpolated between them, so any per-request
sparsity finds its threshold without recalibrating. Channel vectors (CHESS's E[up²]) sit
beside the tables. The file is JSON; a bad one is refused with what is wrong and where.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

FORMAT = "sparsekv-ffn-thresholds"
VERSION = 1
LEVELS = tuple(i / 100 for i in range(100))  # sparsity levels the quantiles are stored at
FILE_NAME = "ffn_thresholds.json"  # inside a model directory; beside a .gguf as <stem>.ffn_thresholds.json


class ThresholdsError(ValueError):
    """A thresholds file that cannot be used (the API and CLI show the message as is)."""


@dataclass
class FFNThresholds:
    model: str
    num_layers: int
    levels: tuple[float, ...] = LEVELS
    tables: dict[str, list[dict[str, list[float]]]] = field(default_factory=dict)  # table -> layer -> site -> quantiles
    channels: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> layer -> per-channel values

    def threshold(self, table: str, layer: int, site: str, sparsity: float) -> float:
        """The score below which a fraction `sparsity` of calibration activations fell."""
        q = self.tables[table][layer][site]
        s = min(max(sparsity, self.levels[0]), self.levels[-1])
        i = min(max(next((k for k, lv in enumerate(self.levels) if lv >= s), len(self.levels) - 1), 1), len(q) - 1)
        lo, hi = self.levels[i - 1], self.levels[i]
        return q[i - 1] + (q[i] - q[i - 1]) * (s - lo) / (hi - lo)

    def require(self, table: str, sites: tuple[str, ...], what: str) -> None:
        missing = [s for s in sites if table not in self.tables or s not in self.tables[table][0]]
        if missing:
            raise ThresholdsError(f"{what} needs the {table!r} table (sites {', '.join(missing)}) in the FFN "
                                  f"thresholds file; run `sparsekv calibrate --method {table} --model ...`")

    def to_json(self) -> dict:
        """Values rounded to 6 significant digits (far finer than the histograms' bins)."""
        def r(v: list[float]) -> list[float]:
            return [float(f"{x:.6g}") for x in v]

        tables = {t: [{s: r(q) for s, q in layer.items()} for layer in layers] for t, layers in self.tables.items()}
        channels = {c: [r(v) for v in layers] for c, layers in self.channels.items()}
        return {"format": FORMAT, "version": VERSION, "model": self.model, "num_layers": self.num_layers,
                "levels": list(self.levels), "tables": tables, "channels": channels}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "FFNThresholds":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ThresholdsError(f"FFN thresholds file {path}: cannot be read as JSON ({e})") from None
        try:
            return cls.from_json(data, num_layers)
        except ThresholdsError as e:
            raise ThresholdsError(f"FFN thresholds file {path}: {e}") from None

    @classmethod
    def from_json(cls, data, num_layers: int | None = None) -> "FFNThresholds":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ThresholdsError(f"not a {FORMAT} file (written by `sparsekv calibrate`)")
        if data.get("version") != VERSION:
            raise ThresholdsError(f"version {data.get('version')!r}; this engine reads version {VERSION}")
        n, levels = data.get("num_layers"), data.get("levels")
        if num_layers is not None and n != num_layers:
            raise ThresholdsError(f"calibrated for {n} layers, the model has {num_layers}: another model's file?")
        if not _numbers(levels) or len(levels) < 2 or sorted(levels) != levels or not 0 <= levels[0] <= levels[-1] < 1:
            raise ThresholdsError("'levels' must be increasing sparsity levels in [0, 1)")
        tables, channels = data.get("tables"), data.get("channels", {})
        if not isinstance(tables, dict) or not isinstance(channels, dict):
            raise ThresholdsError("'tables' and 'channels' must be objects")
        for name, layers in tables.items():
            if not isinstance(layers, list) or len(layers) != n:
                raise ThresholdsError(f"table {name!r} must list {n} layers")
            for i, sites in enumerate(layers):
                for site, q in (sites.items() if isinstance(sites, dict) else [("?", None)]):
                    if not _numbers(q) or len(q) != len(levels) or any(b < a for a, b in zip(q, q[1:])) or q[0] < 0:
                        raise ThresholdsError(f"table {name!r} layer {i} site {site!r}: expected {len(levels)} "
                                              "non-negative, non-decreasing numbers")
        for name, layers in channels.items():
            if not isinstance(layers, list) or len(layers) != n or not all(_numbers(v) for v in layers):
                raise ThresholdsError(f"channels {name!r} must list {n} layers of numbers")
        return cls(str(data.get("model", "")), n, tuple(levels), tables, channels)


def _numbers(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)


def default_path(model: str | Path) -> Path:
    """Where a model's thresholds live: in its directory, or beside its .gguf file."""
    p = Path(model)
    return p / FILE_NAME if p.is_dir() else p.with_name(f"{p.stem}.{FILE_NAME}")


def find_thresholds(model: str | Path, explicit: str | None, num_layers: int) -> FFNThresholds | None:
    """The explicit file, else the one next to the model, else one bundled for that model file."""
    if explicit:
        return FFNThresholds.load(explicit, num_layers)
    bundled = files("sparsekv.ffn") / "data" / f"{Path(model).stem}.{FILE_NAME}"
    for path in (default_path(model), Path(str(bundled))):
        if path.exists():
            return FFNThresholds.load(path, num_layers)
    return None
