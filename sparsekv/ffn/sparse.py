"""What TEAL, WINA and CHESS share: per-site rules, the step plan, and the sparse linear.

A site is the input of a projection: qkv (attention input), o (attention output), gate_up (MLP
input), down (SwiGLU intermediate). A rule drops the inputs whose score |x|·scale is at most a
threshold (per channel), or keeps each row's top k scores. Decode rows go through the kernel
that reads only the weight rows of active inputs (the union over the batch, each row adding
only its own); prefill rows, when the prefill policy sparsifies them, through the dense GEMM
on the masked input (prefill is compute-bound, so skipping rows would not pay there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsekv.attention.kernels.cpu_ops import linear as gemm, silu_mul
from sparsekv.attention.metadata import BatchGroup
from sparsekv.ffn import kernels
from sparsekv.ffn.backend import FFNBackend, GatedMLP
from sparsekv.ffn.kernels.reference import active_mask
from sparsekv.ffn.weights import transposed

SITES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True, eq=False)
class Rule:
    """Keep input i of a row when |x_i|·scale_i > thr_i, or when it is among the row's top k."""

    thr: torch.Tensor  # float32 [in]
    scale: torch.Tensor | None = None  # float32 [in]; None: 1
    topk: int = 0  # > 0: top-k by score instead of the threshold
    out_rows: tuple[int, int] | None = None  # only these output rows are sparse (CHESS: q of qkv)


@dataclass(eq=False)
class SparsePlan:
    group: BatchGroup
    rules: list[dict[str, Rule]]  # per layer; a site without a rule stays dense
    rows: torch.Tensor | None  # prefill: bool [T], the rows the policy sparsifies; None: decode rows


def prefill_rows(group: BatchGroup, fraction: float, device: torch.device) -> torch.Tensor:
    """Rows at the last `fraction` of their prompt's positions (a chunk knows its prompt length
    from rope_len, which spans the whole prompt)."""
    rows = []
    for q, end, prompt in zip(group.q_lens_cpu, group.seq_lens_cpu,
                              group.meta.rope_lens_cpu[group.req_start:group.req_end]):
        cut = prompt - int(round(fraction * prompt))
        rows.extend(p >= cut for p in range(end - q, end))
    return torch.tensor(rows, dtype=torch.bool, device=device)


def keep_mask(x: torch.Tensor, rule: Rule) -> torch.Tensor:
    return active_mask(x, rule.scale, rule.thr, rule.topk)


# Decode batches up to this go through the kernel that reads the union of the rows' active
# inputs, larger ones through the dense GEMM on masked inputs. At batch 8 the union covers 98-99%
# of the weights at 40-50% sparsity, yet the kernel (weights loaded once per chunk for all rows)
# ran the MLP 1.5x faster than the masked small-row GEMM, and about even at 16 (Zen 4,
# benchmarks/ffn_sparsity.py): there the gain is the kernel's, not the sparsity's.
SPARSE_KERNEL_MAX_ROWS = 16


def sparse_linear(x: torch.Tensor, rule: Rule, linear: nn.Linear, rows: torch.Tensor | None) -> torch.Tensor:
    """linear(x) with the rule's inputs dropped (on all rows, or on `rows` of a prefill)."""
    r = rule.out_rows
    weight = linear.weight if r is None else linear.weight[r[0]:r[1]]
    bias = linear.bias if r is None or linear.bias is None else linear.bias[r[0]:r[1]]
    if rows is not None:
        y = gemm(x * (keep_mask(x, rule) | ~rows[:, None]), weight, bias)
    elif x.shape[0] > SPARSE_KERNEL_MAX_ROWS:
        y = gemm(kernels.masked_input(x, rule.scale, rule.thr, rule.topk), weight, bias)
    else:
        y = kernels.sparse_matvec(x, rule.scale, rule.thr, transposed(linear, r), rule.topk)
        y = y if bias is None else y + bias
    if r is None:
        return y
    return torch.cat([y, gemm(x, linear.weight[r[1]:], None if linear.bias is None else linear.bias[r[1]:])], -1)


class ActivationSparseFFN(FFNBackend):
    """Input sparsity on the four sites; subclasses say which rule each site gets."""

    def check(self, spec, state) -> None:
        """Raise ValueError when this model cannot run `spec` (e.g. no calibrated thresholds)."""

    def layer_rules(self, spec, state, layer: int) -> dict[str, Rule]:
        raise NotImplementedError

    def plan(self, group: BatchGroup, spec=None, state=None) -> SparsePlan:
        rules = state.rules(self, spec)
        rows = None if group.phase == "decode" else prefill_rows(group, spec.prefill_sparsify_fraction, state.device)
        return SparsePlan(group, rules, rows)

    def linear(self, x: torch.Tensor, linear: nn.Linear, layer: int, site: str, plan: SparsePlan) -> torch.Tensor:
        rule = plan.rules[layer].get(site)
        return linear(x) if rule is None else sparse_linear(x, rule, linear, plan.rows)

    def forward(self, x: torch.Tensor, mlp: GatedMLP, layer: int, plan: SparsePlan) -> torch.Tensor:
        h = silu_mul(self.linear(x, mlp.gate_up_proj, layer, "gate_up", plan))
        return self.linear(h, mlp.down_proj, layer, "down", plan)
