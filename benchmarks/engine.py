"""Engine throughput on a small model: sparsekv vs transformers.generate, side by side.

Prefill tokens/s = prompt tokens / time of a 1-token generation; decode tokens/s = extra
generated tokens / (time of an N-token generation - time of a 1-token one). Median of
--repeats runs each. Writes results/engine.json and results/engine.png.

    python benchmarks/engine.py [--model DIR] [--prompt-len 512] [--output-len 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def make_model(path: Path) -> str:
    """A random 4-layer, 256-wide Llama with GQA, when no model directory is given."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_model import build_model
    return str(build_model(path, "llama", layers=4, hidden=256, heads=8, kv_heads=4))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_sparsekv(model: str, prompts: list[list[int]], out_len: int, repeats: int, dtype: str) -> tuple[float, float]:
    from sparsekv import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_model_len=len(prompts[0]) + out_len + 8, max_num_seqs=len(prompts),
              max_num_batched_tokens=max(2048, len(prompts[0])), enable_prefix_caching=False)
    run = lambda n: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    t1, tn = timed(lambda: run(1), repeats), timed(lambda: run(out_len), repeats)
    return len(prompts) * len(prompts[0]) / t1, len(prompts) * (out_len - 1) / (tn - t1)


def bench_transformers(model: str, prompts: list[list[int]], out_len: int, repeats: int, dtype: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)

    def run(n: int) -> None:
        with torch.inference_mode():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    t1, tn = timed(lambda: run(1), repeats), timed(lambda: run(out_len), repeats)
    return len(prompts) * len(prompts[0]) / t1, len(prompts) * (out_len - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: a random 4-layer 256-wide Llama)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", default=str(RESULTS / "engine.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = args.model or make_model(Path("/tmp/sparsekv-bench-model"))
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(10, 300, (bs, args.prompt_len)).tolist()
        for name, fn in (("sparsekv", bench_sparsekv), ("transformers", bench_transformers)):
            pre, dec = fn(model, prompts, args.output_len, args.repeats, args.dtype)
            rows.append({"engine": name, "batch": bs, "prefill_tok_s": round(pre, 1), "decode_tok_s": round(dec, 1)})
            print(rows[-1], flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "model": model, "dtype": args.dtype, "prompt_len": args.prompt_len,
                               "output_len": args.output_len, "repeats": args.repeats, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("prefill_tok_s", "decode_tok_s")):
        batches = sorted({r["batch"] for r in rows})
        for i, eng in enumerate(("sparsekv", "transformers")):
            vals = [next(r[key] for r in rows if r["engine"] == eng and r["batch"] == b) for b in batches]
            ax.bar([j + 0.4 * i for j in range(len(batches))], vals, width=0.4, label=eng)
        ax.set_xticks([j + 0.2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(key.replace("_", " "))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
