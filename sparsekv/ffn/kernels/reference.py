"""PyTorch input-sparse products: the fallback path and the reference the kernels are tested against."""
from __future__ import annotations

import torch


def active_mask(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor) -> torch.Tensor:
    """[|x| * scale > thr] per row and channel (scores in float32, as the kernels compute them)."""
    score = x.abs().float()
    return (score * scale if scale is not None else score) > thr


def sparse_matvec_torch(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Gathers the union's rows of wt (each row keeps only its own channels): reads (1 - s) of wt."""
    mask = active_mask(x, scale, thr)
    idx = mask.any(0).nonzero().squeeze(1)
    return (x * mask)[:, idx] @ wt.index_select(0, idx)


def masked_dense(x: torch.Tensor, scale: torch.Tensor | None, thr: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The dense product of the masked input: what every sparse path must equal."""
    return (x * active_mask(x, scale, thr)) @ wt


def gather_dot_torch(x: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x @ m.index_select(0, idx).t()
