"""CHESS (EMNLP'24): channel-wise thresholds on the gate activation, and q/o inputs in attention.

An intermediate channel i is dropped when a_i = silu(gate(x))_i is small for its channel:
|a_i| <= t_i = sqrt(τ / E[up_i²]), τ the `sparsity`-quantile of a_i²·E[up_i²] on the calibration
text (the error a_i·up_i would add). Then up is computed only on the active channels (output-
sparse) and down reads only their rows (input-sparse); gate stays dense. mode cats: one scalar
threshold on |a| (CATS); chess_wo: channel-wise, attention dense; chess_w: channel-wise, and the
inputs of q and o thresholded by their |x| quantile (k and v stay dense).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekv.attention.kernels.cpu_ops import linear as gemm
from sparsekv.ffn import kernels
from sparsekv.ffn.backend import GatedMLP
from sparsekv.ffn.sparse import ActivationSparseFFN, Rule, SparsePlan
from sparsekv.ffn.weights import transposed


class CHESS(ActivationSparseFFN):
    name = "chess"

    def check(self, spec, state) -> None:
        th = state.calibrated("ffn.method chess")
        th.require("chess", ("gate",) if spec.mode == "cats" else ("score",), f"chess (mode {spec.mode})")
        if spec.mode != "cats" and "chess.up_ms" not in th.channels:
            raise ValueError("chess needs the 'chess.up_ms' channels in the FFN thresholds file; recalibrate")
        if spec.mode == "chess_w":
            th.require("teal", ("qkv", "o"), "chess (mode chess_w)")

    def layer_rules(self, spec, state, layer: int) -> dict[str, Rule]:
        th, a = state.thresholds, state.args
        inter = a.intermediate_size
        if spec.mode == "cats":
            rules = {"act": Rule(state.full(th.threshold("chess", layer, "gate", spec.sparsity), inter))}
        else:
            tau = th.threshold("chess", layer, "score", spec.sparsity)
            up_ms = torch.tensor(th.channels["chess.up_ms"][layer], dtype=torch.float32, device=state.device)
            rules = {"act": Rule((tau / up_ms.clamp_min(1e-30)).sqrt())}
        if spec.mode == "chess_w":
            q = a.num_heads * a.head_dim
            rules["qkv"] = Rule(state.full(th.threshold("teal", layer, "qkv", spec.sparsity), a.hidden_size),
                                out_rows=(0, q))
            rules["o"] = Rule(state.full(th.threshold("teal", layer, "o", spec.sparsity), q))
        return rules

    def forward(self, x: torch.Tensor, mlp: GatedMLP, layer: int, plan: SparsePlan) -> torch.Tensor:
        w = mlp.gate_up_proj.weight
        inter = w.shape[0] // 2
        act, thr = F.silu(gemm(x, w[:inter])), plan.rules[layer]["act"].thr
        if plan.rows is not None:  # prefill: dense GEMMs on the masked activation
            return mlp.down_proj(act * ((act.abs().float() > thr) | ~plan.rows[:, None]) * gemm(x, w[inter:]))
        return kernels.gated_sparse_down(x, act, w[inter:], thr, transposed(mlp.down_proj))
