"""Agreement with dense: how far a sparse method's model is from the dense one, with no task.

Per prompt, dense generates greedily; then each method is teacher-forced on dense's
continuation. The step loop of `LLMEngine` is driven here one step at a time, and after every
step the token the method's model chose (its greedy argmax) is recorded and replaced by dense's
token before the next step runs. So the prompt is prefilled by the method's prefill backend and
every forced token goes through a real decode step of its decode backend, with the same paging,
scheduling and caches a served request gets (an "append these tokens" prefill would run the
prefill backend over the continuation instead, and measure the wrong method).

Measured: (a) top-1 agreement of every generated token with dense; (b) per layer, the relative
error of the attention output (the input of `o_proj`, captured by hooks) against dense, over
prefill rows and decode rows; (c) for prefill methods with an offline selection
(`blocks.SELECTIONS`), the recall of dense's block attention mass on a few layers, the selection
recomputed on dense's Q/K.
"""
from __future__ import annotations

import itertools
from statistics import mean
from typing import Any

import torch

from sparsekv.config import SparsityConfig
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.eval import blocks
from sparsekv.eval.capture import Capture, capture
from sparsekv.eval.report import by_cell
from sparsekv.eval.tasks import Sample

_ids = itertools.count()


def forced_run(engine, prompt: str, sparsity: SparsityConfig, max_tokens: int, forced: list[int] | None,
               cap: Capture) -> list[int]:
    """One request through the step loop; returns the token the model picked at every step.
    With `forced`, each pick is replaced by forced[i] before the next step (teacher forcing)."""
    rid = f"agreement-{next(_ids)}"
    n = len(forced) if forced is not None else max_tokens
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=forced is not None),
                       sparsity)
    seq = engine.requests[rid][0]
    picks: list[int] = []
    while rid in engine.requests:
        start = seq.num_computed_tokens
        engine.step()
        cap.tag(start, seq.num_computed_tokens)
        if len(seq.output_token_ids) > len(picks):
            picks.append(seq.token_ids[-1])
            if forced is not None:
                seq.token_ids[-1] = forced[len(picks) - 1]
    return picks


def _rel_errors(dense: Capture, other: Capture, layers: int, prompt_len: int) -> dict[str, list[float]]:
    """Per layer ||A - A_dense|| / ||A_dense|| over the positions both runs computed."""
    out: dict[str, list[float]] = {"prefill": [], "decode": []}
    for layer in range(layers):
        pd, ad = dense.attention(layer)
        po, ao = other.attention(layer)
        common = sorted(set(pd.tolist()) & set(po.tolist()))
        idx = torch.tensor(common)
        rows_d = ad[_index(pd, idx)]
        rows_o = ao[_index(po, idx)]
        for phase, mask in (("prefill", idx < prompt_len), ("decode", idx >= prompt_len)):
            if bool(mask.any()):
                d, o = rows_d[mask], rows_o[mask]
                out[phase].append(float((o - d).norm() / d.norm().clamp(min=1e-12)))
    return out


def _index(positions: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Row of each wanted position (the last row computed for it)."""
    where = {p: i for i, p in enumerate(positions.tolist())}
    return torch.tensor([where[p] for p in wanted.tolist()], dtype=torch.long)


def default_layers(num_layers: int, methods: dict[str, SparsityConfig]) -> list[int]:
    """Two middle layers that every method runs sparse (none kept dense), for the block recall."""
    dense = set().union(*(set(m.dense_layers) for m in methods.values()))
    cands = [i for i in range(num_layers) if i not in dense] or list(range(num_layers))
    return sorted({cands[len(cands) // 2], cands[3 * len(cands) // 4]})


def agreement(llm, samples: list[Sample], methods: dict[str, SparsityConfig], qk_layers: tuple[int, ...],
              progress: Any = None) -> list[dict]:
    """One record per (sample, method other than dense). `llm` must run without a prefix cache,
    so that every run computes the whole prompt and the hooks see every row."""
    engine, model = llm.engine, llm.engine.runner.model
    if engine.config.enable_prefix_caching:
        raise ValueError("agreement needs an engine with enable_prefix_caching=False")
    num_layers = model.args.num_layers
    records = []
    for s in samples:
        prompt_len = len(engine.tokenizer.encode(s.prompt))
        with capture(model, qk_layers) as ref:
            dense_tokens = forced_run(engine, s.prompt, SparsityConfig(), s.max_tokens, None, ref)
        qk = {layer: tuple(x[:, :prompt_len] for x in ref.qk(layer)) for layer in qk_layers}
        for name, cfg in methods.items():
            if name == "dense":
                continue
            with capture(model) as cap:
                picks = forced_run(engine, s.prompt, cfg, s.max_tokens, dense_tokens, cap)
            hits = [int(a == b) for a, b in zip(picks, dense_tokens)]
            rec = {"task": s.task, "length": s.length, "index": s.index, "depth": s.depth, "method": name,
                   "n_tokens": len(hits), "top1_agreement": mean(hits), "first_token_agrees": bool(hits[0]),
                   "attn_rel_error": _rel_errors(ref, cap, num_layers, prompt_len)}
            select = blocks.SELECTIONS.get(cfg.prefill.method)
            if select:
                rec["block_recall"] = {}
                for layer, (q, k) in qk.items():
                    sel, size = select(cfg.prefill.params("prefill").model_dump(), layer, q, k)
                    rec["block_recall"][str(layer)] = blocks.recall(blocks.block_mass(q, k, size), sel)
            records.append(rec)
            if progress is not None:
                progress.update(1)
        del ref, qk
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, length, method): means over samples (per layer for the errors)."""
    rows = []
    for (task, length, method), recs in by_cell(records).items():
        row: dict[str, Any] = {"task": task, "length": length, "method": method, "n": len(recs),
                               "top1_agreement": mean(r["top1_agreement"] for r in recs),
                               "first_token_agreement": mean(float(r["first_token_agrees"]) for r in recs)}
        for phase in ("prefill", "decode"):
            per_layer = [r["attn_rel_error"][phase] for r in recs if r["attn_rel_error"][phase]]
            if per_layer:
                row[f"{phase}_rel_error_by_layer"] = [mean(v) for v in zip(*per_layer)]
                row[f"{phase}_rel_error"] = mean(row[f"{phase}_rel_error_by_layer"])
        recalls = [r["block_recall"] for r in recs if "block_recall" in r]
        if recalls:
            row["block_recall"] = {layer: {m: mean(r[layer][m] for r in recalls) for m in recalls[0][layer]}
                                   for layer in recalls[0]}
        rows.append(row)
    return rows
