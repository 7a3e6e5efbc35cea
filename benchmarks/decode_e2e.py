"""End-to-end decode speed on the default model at long context: dense vs DELTA vs Quest.

One request per (length, method), same prompt, same run: decode tokens/s is (generated - 1)
tokens over the time from the first token to the last (the engine's own request metrics), so
the long prefill is timed apart. Writes results/decode_e2e.json.

    python benchmarks/decode_e2e.py [--model DIR] [--lengths 16384,32768] [--methods dense,delta,quest]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    from sparsekv import LLM, SamplingParams
    from sparsekv.bench.bandwidth import cpu_description
    from sparsekv.config import preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--methods", default="dense,delta,quest")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per cell (prefill is cached)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "decode_e2e.json"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(args.model, dtype=args.dtype, max_model_len=max(lengths) + args.output_len + 16, max_num_seqs=1,
              max_num_batched_tokens=4096)
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for length in lengths:
        prompt = torch.randint(10, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        for method in args.methods.split(","):
            sp = preset(method)
            runs = []
            for _ in range(args.repeats):  # the first run prefills; the prefix cache serves the rest
                out = llm.generate([prompt], params, sparsity=sp, use_tqdm=False)[0]
                runs.append((len(out.outputs[0].token_ids) - 1) / out.metrics.decode_seconds)
            stats = out.sparsity.as_dict()
            rows.append({"length": length, "method": method, "decode_tok_s": round(statistics.median(runs), 2),
                         "runs_tok_s": [round(r, 2) for r in runs],
                         "decode_attended_fraction": stats["decode_attended_fraction"]})
            print(rows[-1], flush=True)
        dense = {r["method"]: r["decode_tok_s"] for r in rows if r["length"] == length}.get("dense")
        for r in rows:
            if r["length"] == length and dense:
                r["speedup_vs_dense"] = round(r["decode_tok_s"] / dense, 2)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({**cpu_description(), "model": llm.engine.model_name, "dtype": args.dtype,
                                    "output_len": args.output_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
