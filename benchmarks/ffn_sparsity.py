"""Activation-sparse FFN (TEAL, WINA, CHESS) on the default model: decode time of the MLP and of
a layer's projections, end-to-end decode tokens/s, and quality on held-out text, vs dense.

MLP / projection times: each layer's real decode inputs (at batch b, the last row of each of b
distinct held-out prompts), run through the backend as a decode step would (the kernel that
reads only active weight rows), one pass over all layers per repeat, each beside a dense pass
(in turn, so both see the same neighbours on a shared host): medians per layer and the median
of the paired ratios.
"proj" is q/k/v + o + MLP: the whole layer but the attention core (short context; the e2e rows
include everything). e2e: `--e2e-repeats` generations of b distinct prompts per cell, each
beside a dense one.
Quality: every position of each held-out text sparsified (prefill_sparsify_fraction 1, the
same masks as decode), perplexity of the next token and top-1 agreement with dense.
Writes results/ffn_sparsity.json and .png.

    python benchmarks/ffn_sparsity.py [--model M] [--methods teal,teal_greedy,wina,chess] [--sparsities 0,0.4,0.5]
        [--batch-sizes 1,8] [--repeats 100] [--output-len 64] [--e2e-repeats 5] [--ppl-texts 0] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch

from timing import interleaved_s

RESULTS = Path(__file__).parent / "results"


def capture_inputs(llm, ids: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """Each (layer, site)'s input rows on one prompt."""
    from sparsekv import SamplingParams
    from sparsekv.ffn.calibrate import hooked

    rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    with hooked(llm.engine.runner.model, lambda i, s, x, out: rows.setdefault((i, s), []).append(x.detach().clone())):
        llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
    return {k: torch.cat(v) for k, v in rows.items()}


@contextmanager
def counting_weight_reads(counter: list[int]):
    """Counts weight elements read by the dense GEMMs (where the model and the FFN backends bind
    them) and by the sparse kernels (their active rows only)."""
    from sparsekv.engine.models import llama
    from sparsekv.ffn import chess, kernels, sparse
    from sparsekv.ffn.kernels.reference import active_mask

    gemm, matvec, down = llama.linear, kernels.sparse_matvec, kernels.gated_sparse_down

    def dense(x, w, b=None):
        counter[0] += w.numel()
        return gemm(x, w, b)

    def sparse_rows(x, scale, thr, wt, topk=0):
        counter[0] += int(active_mask(x, scale, thr, topk).any(0).sum()) * wt.shape[1]
        return matvec(x, scale, thr, wt, topk)

    def gated(x, act, w_up, thr, wt_down):  # up and down read the active channels' rows
        counter[0] += int((act.abs() > thr).any(0).sum()) * (w_up.shape[1] + wt_down.shape[1])
        return down(x, act, w_up, thr, wt_down)

    patches = [(llama, "linear", dense), (sparse, "gemm", dense), (chess, "gemm", dense),
               (kernels, "sparse_matvec", sparse_rows), (kernels, "gated_sparse_down", gated)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def read_fraction(fn, dense_elements: int) -> float:
    counter = [0]
    with counting_weight_reads(counter), torch.inference_mode():
        fn()
    return round(counter[0] / dense_elements, 4)


def ffn(name: str, sparsity: float, **extra) -> dict:
    """The `ffn` section for a method name; teal_greedy is TEAL with the greedy allocation."""
    method, _, alloc = name.partition("_")
    return {"method": method, "sparsity": sparsity, **({"allocation": alloc} if alloc else {}), **extra}


def kernel_rows(llm, inputs, methods, sparsities, batches, repeats) -> list[dict]:
    from sparsekv.config import FFNSection
    from sparsekv.ffn import FFN_BACKENDS
    from sparsekv.ffn.sparse import SparsePlan

    runner = llm.engine.runner
    layers = runner.model.model.layers
    state, n = runner.ffn, len(layers)
    mlp_elements = sum(p.numel() for layer in layers for p in layer.mlp.parameters())
    proj_elements = mlp_elements + sum(layer.self_attn.qkv_proj.weight.numel() + layer.self_attn.o_proj.weight.numel()
                                       for layer in layers)
    dense = FFN_BACKENDS["none"]
    rows = []
    for b in batches:
        x = {k: torch.cat([rows[k][-1:] for rows in inputs[:b]]) for k in inputs[0]}  # each prompt's last row

        def passes(backend, plan):
            def mlp():
                for i in range(n):
                    backend.forward(x[i, "gate_up"], layers[i].mlp, i, plan)

            def proj():
                for i in range(n):
                    attn = layers[i].self_attn
                    backend.linear(x[i, "qkv"], attn.qkv_proj, i, "qkv", plan)
                    backend.linear(x[i, "o"], attn.o_proj, i, "o", plan)
                    backend.forward(x[i, "gate_up"], layers[i].mlp, i, plan)
            return mlp, proj

        base_mlp, base_proj = passes(dense, None)
        for method in methods:
            for s in filter(None, sparsities):  # sparsity 0 is the dense pass itself
                spec = FFNSection(**ffn(method, s))
                backend = FFN_BACKENDS[spec.method]
                mlp, proj = passes(backend, SparsePlan(None, state.rules(backend, spec), None))
                row = {"batch": b, "method": method, "sparsity": s}
                with torch.inference_mode():
                    for part, fn, base in (("mlp", mlp, base_mlp), ("proj", proj, base_proj)):
                        t = interleaved_s(fn, base, repeats)  # in turn with dense: both see the same neighbours
                        row[f"{part}_us_per_layer"] = round(statistics.median(t["wall"]) * 1e6 / n, 2)
                        row[f"{part}_dense_us_per_layer"] = round(statistics.median(t["base_wall"]) * 1e6 / n, 2)
                        row[f"{part}_speedup"] = round(statistics.median(
                            d / w for d, w in zip(t["base_wall"], t["wall"])), 3)
                row["mlp_weight_read_fraction"] = read_fraction(mlp, mlp_elements)
                row["proj_weight_read_fraction"] = read_fraction(proj, proj_elements)
                rows.append(row)
                print(row, flush=True)
    return rows


def e2e_rows(llm, prompts, methods, sparsities, batches, output_len, repeats) -> list[dict]:
    from sparsekv import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    def tok_s(b: int, sp: dict | None) -> float:
        outs = llm.generate(prompts[:b], params, sparsity=sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) - 1 for o in outs) / max(o.metrics.decode_seconds for o in outs)

    rows = []
    for b in batches:
        llm.generate(prompts[:b], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        for method in methods:
            for s in filter(None, sparsities):
                sp = {"ffn": ffn(method, s)}
                tok_s(b, sp)  # warm-up: first-use layouts and rules
                pairs = [(tok_s(b, sp), tok_s(b, None)) for _ in range(repeats)]  # in turn with dense
                rows.append({"batch": b, "method": method, "sparsity": s,
                             "decode_tok_s": round(statistics.median(p[0] for p in pairs), 2),
                             "dense_decode_tok_s": round(statistics.median(p[1] for p in pairs), 2),
                             "speedup": round(statistics.median(p[0] / p[1] for p in pairs), 3)})
                print(rows[-1], flush=True)
    return rows


def position_logits(llm, ids: list[int], sparsity: dict) -> torch.Tensor:
    """Logits at every position of one prompt, from the final norm's output of its prefill."""
    from sparsekv import SamplingParams

    model = llm.engine.runner.model
    hidden: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: hidden.append(out.detach().clone()))
    try:
        llm.generate([ids], SamplingParams(max_tokens=1), sparsity=sparsity, use_tqdm=False)
    finally:
        handle.remove()
    with torch.inference_mode():
        return model.compute_logits(torch.cat(hidden))


def quality_rows(llm, texts, methods, sparsities) -> list[dict]:
    prompts = [llm.tokenizer(t).input_ids for t in texts]
    dense = [position_logits(llm, ids, None) for ids in prompts]
    rows = []
    for method in methods:
        for s in sparsities:
            sp = {"ffn": ffn(method, s, prefill_sparsify_fraction=1.0)}
            nll, agree, count = 0.0, 0, 0
            for ids, ref in zip(prompts, dense):
                logits = position_logits(llm, ids, sp)
                target = torch.tensor(ids[1:])
                nll += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                count += len(ids) - 1
            rows.append({"method": method, "sparsity": s, "perplexity": round(math.exp(nll / count), 4),
                         "top1_agreement": round(agree / (count + len(prompts)), 4), "tokens": count})
            print(rows[-1], flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("kernels", "mlp_speedup", "MLP decode speedup vs dense"), ("e2e", "speedup", "decode tok/s vs dense"),
              ("quality", "perplexity", "held-out perplexity")]
    for ax, (part, key, title) in zip(axes, panels):
        series: dict[str, list] = {}
        for r in result[part]:
            series.setdefault(f"{r['method']}" + (f" b{r['batch']}" if "batch" in r else ""), []).append(r)
        for label, rs in series.items():
            ax.plot([r["sparsity"] for r in rs], [r[key] for r in rs], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} ({result['dtype']}, {result['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from sparsekv import LLM
    from sparsekv.bench.bandwidth import cpu_description
    from sparsekv.ffn.calibrate import default_texts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ffn-thresholds", default=None)
    ap.add_argument("--methods", default="teal,teal_greedy,wina,chess")
    ap.add_argument("--sparsities", default="0,0.4,0.5")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=100, help="timed passes over all layers per kernel cell")
    ap.add_argument("--output-len", type=int, default=64, help="decode tokens per e2e request")
    ap.add_argument("--e2e-repeats", type=int, default=5, help="e2e generations per cell, each beside a dense one")
    ap.add_argument("--ppl-texts", type=int, default=0, help="held-out texts for quality (0: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: kernels,e2e,quality")
    ap.add_argument("--output", default=str(RESULTS / "ffn_sparsity.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, skip = args.methods.split(","), set(filter(None, args.skip.split(",")))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if 0.0 not in sparsities:
        sparsities.insert(0, 0.0)  # quality's dense baseline
    batches = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(args.model, dtype="float32", device="cpu", enable_prefix_caching=False, max_num_seqs=max(batches),
              max_model_len=1024, ffn_thresholds=args.ffn_thresholds)
    heldout = default_texts()[1]
    heldout = heldout[:args.ppl_texts] if args.ppl_texts else heldout
    # distinct prompts, one per batch row: identical rows would share one set of active inputs
    prompts = [llm.tokenizer(heldout[i % len(heldout)] + " " + heldout[(i + 1) % len(heldout)]).input_ids
               for i in range(max(batches))]
    result = {**cpu_description(), "model": llm.engine.model_name, "dtype": "float32",
              "threads": torch.get_num_threads(), "repeats": args.repeats, "output_len": args.output_len}
    result["kernels"] = [] if "kernels" in skip else kernel_rows(
        llm, [capture_inputs(llm, ids) for ids in prompts], methods, sparsities, batches, args.repeats)
    result["e2e"] = [] if "e2e" in skip else e2e_rows(llm, prompts, methods, sparsities, batches, args.output_len, args.e2e_repeats)
    result["quality"] = [] if "quality" in skip else quality_rows(llm, heldout, methods, sparsities)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
