"""WINA: drop inputs by |x_i|·‖W[:, i]‖₂, the input's contribution bound to the output, not |x_i| alone.

mask_by topk (the authors' script default) keeps int(in·(1 - s)) inputs per token and needs
no calibration; mask_by threshold uses the calibrated quantile of the weighted score. The
paper weights every projection, the released code only k and gate: `colnorm_sites` chooses
(a site left out scores by |x| alone, TEAL's rule). Fused q/k/v and gate/up share one mask,
weighted by the fused matrix's column norm. The optional SVD rotation is not implemented.
"""
from __future__ import annotations

from sparsekv.ffn.sparse import SITES, ActivationSparseFFN, Rule
from sparsekv.ffn.weights import colnorm


class WINA(ActivationSparseFFN):
    name = "wina"

    def check(self, spec, state) -> None:
        if spec.mask_by == "threshold":
            th = state.calibrated("ffn.method wina with mask_by threshold")
            th.require("wina", tuple(s for s in SITES if s in spec.colnorm_sites), "wina (mask_by threshold)")
            th.require("teal", tuple(s for s in SITES if s not in spec.colnorm_sites), "wina (mask_by threshold)")

    def layer_rules(self, spec, state, layer: int) -> dict[str, Rule]:
        rules = {}
        for site, lin in state.linears(layer).items():
            scale = colnorm(lin) if site in spec.colnorm_sites else None
            n = lin.in_features
            if spec.mask_by == "topk":
                rules[site] = Rule(state.full(0.0, n), scale, topk=max(1, int(n * (1 - spec.sparsity))))
            else:
                table = "wina" if scale is not None else "teal"
                rules[site] = Rule(state.full(state.thresholds.threshold(table, layer, site, spec.sparsity), n), scale)
        return rules
