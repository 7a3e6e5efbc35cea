"""TEAL (ICLR'25): drop each projection input whose magnitude is at most a calibrated threshold.

The threshold of a site is the `sparsity`-quantile of |x| on the calibration text (from |x|
histograms, not the paper's symmetric icdf(0.5 + s/2), which assumes a symmetric distribution).
q/k/v share their input and so one threshold, as gate/up do: uniform sparsity, as in the paper's
main results (its greedy per-projection allocation is not implemented).
"""
from __future__ import annotations

from sparsekv.ffn.sparse import SITES, ActivationSparseFFN, Rule


class TEAL(ActivationSparseFFN):
    name = "teal"

    def check(self, spec, state) -> None:
        state.calibrated("ffn.method teal").require("teal", SITES, "ffn.method teal")

    def layer_rules(self, spec, state, layer: int) -> dict[str, Rule]:
        th = state.calibrated("ffn.method teal")
        return {site: Rule(state.full(th.threshold("teal", layer, site, spec.sparsity), lin.in_features))
                for site, lin in state.linears(layer).items()}
