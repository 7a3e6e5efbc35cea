"""TEAL (ICLR'25): drop each projection input whose magnitude is at most a calibrated threshold.

The threshold of a site is the `sparsity`-quantile of |x| on the calibration text (from |x|
histograms, not the paper's symmetric icdf(0.5 + s/2), which assumes a symmetric distribution).
q/k/v share their input and so one threshold, as gate/up do. allocation uniform: every site at
`sparsity`; greedy: each layer's site sparsities from the calibrated greedy path (ffn/greedy.py)
at effective sparsity `sparsity`.
"""
from __future__ import annotations

from sparsekv.ffn.sparse import SITES, ActivationSparseFFN, Rule


class TEAL(ActivationSparseFFN):
    name = "teal"

    def check(self, spec, state) -> None:
        th = state.calibrated("ffn.method teal")
        th.require("teal", SITES, "ffn.method teal")
        if spec.allocation == "greedy":
            th.require("teal_greedy", SITES, "teal with allocation greedy (calibrate --greedy)")

    def layer_rules(self, spec, state, layer: int) -> dict[str, Rule]:
        th = state.calibrated("ffn.method teal")
        rules = {}
        for site, lin in state.linears(layer).items():
            s = spec.sparsity if spec.allocation == "uniform" else th.threshold("teal_greedy", layer, site, spec.sparsity)
            rules[site] = Rule(state.full(th.threshold("teal", layer, site, s), lin.in_features))
        return rules
