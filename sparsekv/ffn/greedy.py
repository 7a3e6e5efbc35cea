"""TEAL's block-wise greedy allocation: per layer, which sites to sparsify more, by the error it costs.

Starting from dense, each round tries, for every layer at once, raising one site's sparsity so
that the layer's effective sparsity (Σ w·s / Σ w, w the site's parameter count) grows by `step`;
each layer keeps the candidate whose layer output, on the calibration text, is closest (mean L2
over the last quarter of each text's positions) to the dense one. Every layer runs on its stored
dense input, so one forward pass scores a candidate for all layers. The path is resampled onto
the thresholds' sparsity levels as table `teal_greedy` (site sparsity at each effective level,
the row closest to it), which `allocation: greedy` reads. Deviation: `step` counts effective
sparsity, where TEAL raises one site by 0.05 / w (far more rounds for the same path).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from sparsekv.config import FFNSection
from sparsekv.ffn.backend import FFN_BACKENDS
from sparsekv.ffn.sparse import SITES, Rule
from sparsekv.ffn.thresholds import FFNThresholds

log = logging.getLogger(__name__)


@contextmanager
def replay(model, stored: list[list[tuple]] | None, inputs: list[list[tuple]], outputs: list[list[torch.Tensor]]):
    """Each layer's (x, residual) inputs per call into `inputs` and its output hidden state (the
    two summed, as the next norm does) into `outputs`; with `stored`, the inputs are replaced by
    the stored ones (copies: the layer's norm adds into the residual in place)."""
    handles, calls = [], [0] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        def pre(m, args, i=i):
            if stored is None:
                inputs[i].append(tuple(None if a is None else a.detach().clone() for a in args[:2]))
                return None
            return (*(None if a is None else a.clone() for a in stored[i][calls[i]]), *args[2:])

        def post(m, args, out, i=i):
            outputs[i].append((out[0] + out[1]).detach())
            calls[i] += 1

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def greedy_table(llm, texts: list[str], th: FFNThresholds, max_tokens: int, step: float = 0.05,
                 max_target: float = 0.9, error_last_fraction: float = 0.25) -> list[dict[str, list[float]]]:
    from sparsekv import SamplingParams

    engine, model = llm.engine, llm.engine.runner.model
    state = engine.runner.ffn
    state.thresholds = th  # the calibration engine's own: its trial configs pass the engine's checks
    backend = FFN_BACKENDS["teal"]
    n = model.args.num_layers
    weights = {s: lin.weight.numel() for s, lin in state.linears(0).items()}
    total = sum(weights.values())
    prompts = [llm.tokenizer(t).input_ids[:max_tokens] for t in texts]
    params = SamplingParams(max_tokens=1)

    def run(sparsity: dict | None, stored) -> tuple[list, list]:
        ins, outs = [[] for _ in range(n)], [[] for _ in range(n)]
        with replay(model, stored, ins, outs), torch.inference_mode():
            for p in prompts:  # one prompt per step: each call's rows are one text's positions
                llm.generate([p], params, sparsity=sparsity, use_tqdm=False)
        return ins, outs

    stored, dense_out = run(None, None)
    alloc = [{s: 0.0 for s in SITES} for _ in range(n)]
    path = [[(0.0, dict(a))] for a in alloc]
    spec = FFNSection(method="teal", sparsity=0.5, prefill_sparsify_fraction=1.0)
    while min(sum(weights[s] * a[s] for s in SITES) / total for a in alloc) < max_target:
        errors = []
        for site in SITES:
            bump = step * total / weights[site]
            trial = [{**a, site: min(a[site] + bump, th.levels[-1])} for a in alloc]
            state.install(backend, spec, [{s: Rule(state.full(th.threshold("teal", i, s, t[s]), lin.in_features))
                                          for s, lin in state.linears(i).items()} for i, t in enumerate(trial)])
            outs = run({"ffn": spec.model_dump()}, stored)[1]
            errors.append([sum(float((o - d)[-max(1, int(len(o) * error_last_fraction)):].norm(dim=-1).mean())
                               for o, d in zip(outs[i], dense_out[i])) for i in range(n)])
        for i, a in enumerate(alloc):
            open_sites = [(e[i], k) for k, e in enumerate(errors) if a[SITES[k]] < th.levels[-1]]
            if not open_sites:
                continue
            best = min(open_sites)[1]
            a[SITES[best]] = min(a[SITES[best]] + step * total / weights[SITES[best]], th.levels[-1])
            path[i].append((sum(weights[s] * a[s] for s in SITES) / total, dict(a)))
        log.info("greedy: effective sparsity %.3f .. %.3f", *(f(p[-1][0] for p in path) for f in (min, max)))
    state.install(backend, spec, None)
    table = []
    for rows in path:
        picked = [min(rows, key=lambda r: abs(r[0] - lv))[1] for lv in th.levels]
        table.append({s: [r[s] for r in picked] for s in SITES})
    return table
