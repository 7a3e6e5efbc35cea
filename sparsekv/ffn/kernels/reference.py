"""PyTorch input-sparse products: the fallback path and the reference the kernels are tested against."""
from __future__ import annotations

import torch


def active_mask(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """[|x| * scale > thr] per row and channel, or each row's top-k scores when topk > 0
    (scores in float32, as the kernels compute them)."""
    score = x.abs().float()
    score = score * scale if scale is not None else score
    if not topk:
        return score > thr
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(topk, dim=1).indices, True)


def sparse_matvec_torch(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor,
                        topk: int = 0) -> torch.Tensor:
    """Gathers the union's rows of wt (each row keeps only its own channels): reads (1 - s) of wt."""
    mask = active_mask(x, scale, thr, topk)
    idx = mask.any(0).nonzero().squeeze(1)
    return (x * mask)[:, idx] @ wt.index_select(0, idx)


def masked_dense(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor,
                 topk: int = 0) -> torch.Tensor:
    """The dense product of the masked input: what every sparse path must equal."""
    return (x * active_mask(x, scale, thr, topk)) @ wt


def gated_sparse_down_torch(x: torch.Tensor, act: torch.Tensor, w_up: torch.Tensor, thr: torch.Tensor,
                            wt_down: torch.Tensor) -> torch.Tensor:
    """(act ⊙ [|act| > thr] ⊙ (x @ w_upᵀ)) @ wt_down with up computed on the union's channels only."""
    active = act.abs().float() > thr
    idx = active.any(0).nonzero().squeeze(1)
    h = (act * active)[:, idx] * (x @ w_up.index_select(0, idx).t())
    return h @ wt_down.index_select(0, idx)
