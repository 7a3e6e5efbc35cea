"""`sparsekv calibrate`: propose a model's sparse-method parameters from its own activations.

DELTA: Δ-layers belong where the hidden state turns most from one layer to the next (1 - cosine
similarity of a token's hidden state before and after the layer, averaged over tokens and
samples): there the attention pattern is likely to drift, so the page selection is refreshed.
Peaks are taken greedily by height, never two adjacent layers and never a dense layer.
Writes a SparsityConfig JSON (FILE) and the shift curve beside it (FILE with .shift.json).

TEAL, WINA, CHESS: activation thresholds from histograms on a calibration text (--data, or the
bundled set), written as an FFN thresholds file (sparsekv.ffn.thresholds); an existing file at
FILE for the same model keeps its other methods' tables. The engine reads it by
--ffn-thresholds FILE, or when it lies next to the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

FFN_METHODS = ("teal", "wina", "chess")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", required=True, help="delta | teal | wina | chess")
    p.add_argument("--data", default=None, help="FFN methods: calibration text (.txt: paragraphs split by blank "
                   "lines; .jsonl: a 'text' per line); default: the bundled set")
    p.add_argument("--samples", type=int, default=8, help="sample texts to average over (delta; teal --greedy)")
    p.add_argument("--greedy", action="store_true", help="teal: also the greedy per-layer allocation")
    p.add_argument("--sample-tokens", type=int, default=512, help="tokens per sample text")
    p.add_argument("--num-delta-layers", type=int, default=None,
                   help="Δ-layers to propose (default: about one per 8 layers, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="SparsityConfig JSON (delta) or FFN thresholds JSON to write")


def sample_texts(n: int, words_per_text: int, seed: int) -> list[str]:
    """Offline sample text: sentences of random words from wonderwords' word lists."""
    from importlib.resources import files

    assets = files("wonderwords") / "assets"
    pools = [(assets / f"{kind}list.txt").read_text().split() for kind in ("adjective", "noun", "verb")]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words: list[str] = []
        while len(words) < words_per_text:
            adj, noun, verb = (rng.choice(pool) for pool in pools)
            words += ["the", adj, noun, verb + "s", "the", rng.choice(pools[1]) + "."]
        texts.append(" ".join(words).capitalize())
    return texts


def layer_shift(model_dir: str, texts: list[str], max_tokens: int) -> list[float]:
    """Mean 1 - cos(h_in, h_out) per layer; the last layer's output carries the final norm."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsekv.engine.loader import load_tokenizer, transformers_source

    tok = load_tokenizer(model_dir)
    source, kwargs = transformers_source(model_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
    total = None
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states  # layers + 1 of [1, T, H]
        shift = torch.stack([1 - torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1).mean()
                             for a, b in zip(hs[:-1], hs[1:])])
        total = shift if total is None else total + shift
    return (total / len(texts)).tolist()


def pick_peaks(shift: list[float], k: int, exclude: set[int]) -> list[int]:
    """The k highest layers of the curve, no two adjacent, none in `exclude`; sorted."""
    chosen: list[int] = []
    for layer in sorted(range(len(shift)), key=lambda i: -shift[i]):
        if len(chosen) == k:
            break
        if layer not in exclude and all(abs(layer - c) > 1 for c in chosen):
            chosen.append(layer)
    if len(chosen) < k:
        log.warning("only %d Δ-layers fit (asked for %d)", len(chosen), k)
    return sorted(chosen)


def read_texts(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def run_ffn(args: argparse.Namespace) -> int:
    from sparsekv import LLM
    from sparsekv.ffn.calibrate import calibrate, default_texts
    from sparsekv.ffn.thresholds import FFNThresholds, ThresholdsError

    texts = read_texts(args.data) if args.data else default_texts()[0]
    llm = LLM(args.model, dtype="float32", device="cpu", max_num_seqs=4, enable_prefix_caching=False,
              max_model_len=args.sample_tokens + 8, kv_cache_memory=1 << 28)
    th = calibrate(llm, args.method, texts, args.sample_tokens)
    if args.greedy:
        if args.method != "teal":
            raise ValueError("--greedy is TEAL's allocation: use it with --method teal")
        from sparsekv.ffn.greedy import greedy_table

        th.tables["teal_greedy"] = greedy_table(llm, texts[:args.samples], th, args.sample_tokens)
    out = Path(args.output)
    if out.exists():
        try:
            old = FFNThresholds.load(out, th.num_layers)
            th.tables, th.channels = {**old.tables, **th.tables}, {**old.channels, **th.channels}
        except ThresholdsError as e:
            log.warning("replacing %s: %s", out, e)
    th.save(out)
    log.info("wrote %s tables %s to %s", args.method, ", ".join(th.tables), out)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.method in FFN_METHODS:
        return run_ffn(args)
    if args.method != "delta":
        raise ValueError(f"calibrate: unknown method {args.method!r}; available: delta, {', '.join(FFN_METHODS)}")
    from sparsekv.attention.delta import default_delta_layers
    from sparsekv.config import SparsityConfig, default_model
    from sparsekv.engine.loader import read_config

    model_dir = args.model or default_model()
    read_config(model_dir)  # a clear error for a path that is no model
    texts = sample_texts(args.samples, args.sample_tokens, args.seed)
    shift = layer_shift(model_dir, texts, args.sample_tokens)
    k = args.num_delta_layers or max(1, len(default_delta_layers(len(shift))))
    dense = SparsityConfig().dense_layers
    layers = pick_peaks(shift, k, set(dense))
    config = {"decode": {"method": "delta", "delta_layers": layers}}
    SparsityConfig.model_validate(config)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2) + "\n")
    curve = out.with_suffix(".shift.json")
    curve.write_text(json.dumps({"model": model_dir, "method": "delta", "samples": len(texts),
                                 "dense_layers": list(dense), "delta_layers": layers,
                                 "shift": [round(s, 6) for s in shift]}, indent=2) + "\n")
    log.info("Δ-layers %s from shift %s; wrote %s and %s", layers, [round(s, 4) for s in shift], out, curve)
    return 0
