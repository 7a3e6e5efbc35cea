"""How much attention mass HiP's decode search keeps, against the best pages at the same budget.

One needle prompt through the default model's dense prefill and first decode step; for every
layer, that step's roped query against the layer's keys: the pages HiP's tree keeps per KV head
(sink, kept middle pages, window: hip_plan.search + decode_pages, exactly as a decode refresh)
and an oracle that keeps the same number of middle pages per KV head by their true attention mass
(summed over the group's heads). Reported per layer: the mean share of each query head's softmax
mass inside the kept tokens, and the relative error of the attention output restricted to them.

    python benchmarks/hip_recall.py [--model PATH] [--length 4096] [--task passkey] [--depth 0.5]
Writes results/hip_recall.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def capture(model: str | None, length: int, task: str, depth: float, seed: int) -> tuple[dict, list]:
    """Every layer's (q, k, v) of the prompt and its first decode step: q [L+1, Hq, D], k, v [Hkv, L+1, D]."""
    from sparsekv import LLM
    from sparsekv.bench.captured import record_qkv
    from sparsekv.eval.tasks import generate

    llm = LLM(model, dtype="float32", max_model_len=length + 4, max_num_seqs=1, enable_prefix_caching=False)
    tok = llm.tokenizer
    sample = generate(task, length, 0, lambda text: len(tok.encode(text)), seed=seed, depths=(depth,))
    layers = record_qkv(llm, tok.encode(sample.prompt), list(range(llm.engine.runner.model.args.num_layers)))
    return {"task": task, "length": length, "depth": depth, "seed": seed}, [layers[i] for i in sorted(layers)]


def token_mask(pages: list[torch.Tensor], n: int, page: int) -> torch.Tensor:
    """[Hkv, n] True at the tokens of each KV head's listed pages (-1: none)."""
    mask = torch.zeros(len(pages), -(-n // page) * page, dtype=torch.bool)
    for h, ids in enumerate(pages):
        ids = ids[ids >= 0]
        mask[h].view(-1, page)[ids] = True
    return mask[:, :n]


def kept_share(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """(mean softmax mass inside `keep` [Hkv, n], mean relative output error attending only it)."""
    g = q.shape[0] // k.shape[0]
    kk, vv, m = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), keep.repeat_interleave(g, 0)
    s = torch.einsum("hd,hnd->hn", q, kk) * q.shape[-1] ** -0.5
    p, ps = s.softmax(-1), s.masked_fill(~m, float("-inf")).softmax(-1)
    o, os = torch.einsum("hn,hnd->hd", p, vv), torch.einsum("hn,hnd->hd", ps, vv)
    return float((p * m).sum(-1).mean()), float(((os - o).norm(dim=-1) / o.norm(dim=-1)).mean())


def layer_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, page: int) -> dict:
    from sparsekv.attention.hip_plan import HiPParams, decode_pages, middle_blocks, search
    from sparsekv.attention.hip_search import torch_probe

    p, n = HiPParams(), k.shape[1]
    qd, hkv = q[-1], k.shape[0]
    lo, hi = middle_blocks(p, n, page)
    bounds = torch.full((hkv,), lo), torch.full((hkv,), hi)
    kept, _ = search(p, torch_probe(qd.view(hkv, -1, qd.shape[-1]), k, torch.arange(hkv)), *bounds, page)
    hip = decode_pages(p, kept, n, page, page)
    count = int((kept >= 0).sum(1).max())
    s = torch.einsum("hgd,hnd->hgn", qd.view(hkv, -1, qd.shape[-1]), k) * qd.shape[-1] ** -0.5
    mass = s.softmax(-1).sum(1)  # [Hkv, n]: the group's mass per token
    per_page = torch.nn.functional.pad(mass, (0, -n % page)).view(hkv, -1, page).sum(-1)
    middle = torch.zeros(per_page.shape[1], dtype=torch.bool)
    middle[lo:hi] = True
    fixed = torch.arange(per_page.shape[1])[~middle]
    oracle = [torch.cat([fixed, per_page[h].masked_fill(~middle, -1).topk(count).indices]) for h in range(hkv)]
    hip_mask, oracle_mask = token_mask(list(hip), n, page), token_mask(oracle, n, page)
    (hm, he), (om, oe) = kept_share(qd, k, v, hip_mask), kept_share(qd, k, v, oracle_mask)
    return {"attended": float(hip_mask.float().mean()), "hip_mass": hm, "hip_error": he,
            "oracle_mass": om, "oracle_error": oe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(RESULTS / "hip_recall.json"))
    args = ap.parse_args()
    info, layers = capture(args.model, args.length, args.task, args.depth, args.seed)
    rows = [{"layer": i, **layer_row(q, k, v, 16)} for i, (q, k, v) in enumerate(layers)]
    Path(args.output).write_text(json.dumps({**info, "page": 16, "rows": rows}, indent=2))
    for r in rows:
        print(f"layer {r['layer']:2d} attended {r['attended']:.3f}  HiP mass {r['hip_mass']:.3f} "
              f"error {r['hip_error']:.3f}  oracle mass {r['oracle_mass']:.3f} error {r['oracle_error']:.3f}")


if __name__ == "__main__":
    main()
