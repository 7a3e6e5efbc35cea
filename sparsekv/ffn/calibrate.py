"""FFN calibration: activation histograms on a calibration text, quantiles into a thresholds file.

The engine's own model runs the text as prompts (prefill rows) while forward hooks on its
projections histogram each site's score: |x| (TEAL, and CHESS's q/o inputs), |x|·‖W[:, i]‖
(WINA), and for CHESS |silu(gate)| (CATS) and then, with E[up²] from a first pass, the channel
importance silu(gate)²·E[up²]. Histograms have log-spaced bins (0.3% wide), so a quantile read
from one drops the target fraction of the calibration activations within well under 1%.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from importlib.resources import files
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sparsekv.ffn.thresholds import LEVELS, FFNThresholds
from sparsekv.ffn.weights import colnorm

log = logging.getLogger(__name__)
SITE_MODULES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                "down": "mlp.down_proj"}
TABLES = {"teal": ("teal",), "wina": ("teal", "wina"), "chess": ("teal", "chess")}  # what each method reads


def default_texts() -> tuple[list[str], list[str]]:
    """The bundled calibration text (paragraphs) and its held-out part (every fourth one)."""
    paras = [p.strip() for p in (files("sparsekv.ffn") / "data" / "calibration.txt").read_text().split("\n\n")]
    paras = [p for p in paras if p]
    return [p for i, p in enumerate(paras) if i % 4 != 3], [p for i, p in enumerate(paras) if i % 4 == 3]


class LogHistogram:
    """Counts of a non-negative score in log2-spaced bins, plus an underflow bin (zeros) and an overflow bin."""

    LO, HI, BINS = -40.0, 24.0, 16384

    def __init__(self) -> None:
        self.counts = torch.zeros(self.BINS + 2, dtype=torch.float64)

    def add(self, v: torch.Tensor) -> None:
        pos = (torch.log2(v.detach().float().flatten().clamp_min(2.0 ** -100)) - self.LO) / (self.HI - self.LO)
        idx = (pos * self.BINS).floor().clamp(-1, self.BINS).long() + 1
        self.counts += torch.bincount(idx, minlength=self.BINS + 2).double()

    def quantiles(self, levels: tuple[float, ...]) -> list[float]:
        """The score below which each level's fraction falls, interpolated within its bin."""
        cdf = self.counts.cumsum(0) / self.counts.sum()
        width = (self.HI - self.LO) / self.BINS
        out = []
        for q in levels:
            i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64), right=True))
            if i == 0:
                out.append(0.0)  # inside the zeros
                continue
            i = min(i, self.BINS)
            below = float(cdf[i - 1])
            frac = (q - below) / max(float(cdf[i]) - below, 1e-300)
            out.append(2.0 ** (self.LO + (i - 1 + frac) * width))
        return [max(a, b) for a, b in zip(out, [0.0] + out[:-1])]  # non-decreasing despite rounding


@contextmanager
def hooked(model, hook: Callable[[int, str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """hook(layer, site, input, output) for every projection the sparse FFN drops inputs of."""
    handles = []
    for i, block in enumerate(model.model.layers):
        for site, path in SITE_MODULES.items():
            mod = block.get_submodule(path)
            handles.append(mod.register_forward_hook(lambda m, a, out, i=i, s=site: hook(i, s, a[0], out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_texts(llm, texts: list[str], max_tokens: int) -> int:
    """Prefill each text as a prompt (the hooks see its rows); the number of tokens run. The
    engine must not cache prefixes: a cached prefix's rows would not run again."""
    from sparsekv import SamplingParams

    if llm.engine.config.enable_prefix_caching:
        raise ValueError("calibration runs need an engine without prefix caching (enable_prefix_caching=False)")
    prompts = [llm.tokenizer(t).input_ids[:max_tokens] for t in texts]
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return sum(len(p) for p in prompts)


def calibrate(llm, method: str, texts: list[str], max_tokens: int = 512) -> FFNThresholds:
    """Thresholds for `method` (teal | wina | chess) from the model's activations on `texts`."""
    model = llm.engine.runner.model
    n = model.args.num_layers
    wanted = TABLES[method]
    hist: dict[tuple[str, int, str], LogHistogram] = {}
    up_sq = [torch.zeros(model.args.intermediate_size, dtype=torch.float64) for _ in range(n)]
    rows = [0] * n

    def add(table: str, layer: int, site: str, v: torch.Tensor) -> None:
        hist.setdefault((table, layer, site), LogHistogram()).add(v)

    def first(layer: int, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
        lin = model.model.layers[layer].get_submodule(SITE_MODULES[site])
        add("teal", layer, site, x.abs())
        if "wina" in wanted:
            add("wina", layer, site, x.abs().float() * colnorm(lin))
        if "chess" in wanted and site == "gate_up":
            gate, up = out.float().chunk(2, dim=-1)
            add("chess", layer, "gate", F.silu(gate).abs())
            up_sq[layer] += up.double().pow(2).sum(0).cpu()
            rows[layer] += up.shape[0]

    with hooked(model, first):
        tokens = run_texts(llm, texts, max_tokens)
    channels = {}
    if "chess" in wanted:
        up_ms = [(s / max(r, 1)).float() for s, r in zip(up_sq, rows)]
        channels["chess.up_ms"] = [v.tolist() for v in up_ms]

        def second(layer: int, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
            if site == "gate_up":
                gate = out.float().chunk(2, dim=-1)[0]
                add("chess", layer, "score", F.silu(gate).pow(2) * up_ms[layer].to(gate.device))

        with hooked(model, second):
            run_texts(llm, texts, max_tokens)
    tables: dict[str, list[dict[str, list[float]]]] = {}
    for (table, layer, site), h in sorted(hist.items()):
        tables.setdefault(table, [{} for _ in range(n)])[layer][site] = h.quantiles(LEVELS)
    log.info("calibrated %s on %d texts (%d tokens): tables %s", method, len(texts), tokens, ", ".join(tables))
    return FFNThresholds(model=str(llm.engine.config.model), num_layers=n, tables=tables, channels=channels)


def achieved(llm, texts: list[str], th: FFNThresholds, table: str, sparsity: float,
             max_tokens: int = 512) -> dict[tuple[int, str], float]:
    """Fraction of each (layer, site)'s inputs that table's thresholds drop on `texts` (TEAL / WINA
    scores): the measured side of the calibrated target."""
    model = llm.engine.runner.model
    counts: dict[tuple[int, str], list[int]] = {}

    def measure(layer: int, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
        score = x.abs().float()
        if table == "wina":
            score = score * colnorm(model.model.layers[layer].get_submodule(SITE_MODULES[site]))
        c = counts.setdefault((layer, site), [0, 0])
        c[0] += int((score <= th.threshold(table, layer, site, sparsity)).sum())
        c[1] += score.numel()

    with hooked(model, measure):
        run_texts(llm, texts, max_tokens)
    return {k: a / b for k, (a, b) in counts.items()}
