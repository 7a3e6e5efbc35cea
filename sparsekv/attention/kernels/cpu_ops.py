"""A layer's small ops (RMSNorm with the residual add, rope, SiLU-and-mul) fused on CPU, and
the small-row GEMM of decode steps.

Each is one call of the compiled extension (csrc/layer_ops.cpp) on CPU float32/bfloat16 tensors
and the PyTorch composition elsewhere; the composition is also the reference the tests compare
against. Fusing matters for decode: a step is dozens of tiny ops per layer, each paying ATen's
dispatch, which on a 135M model cost about as much as reading the attention's KV.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekv.attention.kernels.cpu_build import available, ops

_DTYPES = (torch.float32, torch.bfloat16)
SMALL_GEMM_MAX_ROWS = 16  # the compiled kernel's row limit (csrc/small_gemm.cpp kMaxRows); MKL takes larger inputs


def _fused(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and not torch.is_grad_enabled() and available()


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * r / rms(r) over the last dim, r = x, or r = residual + x with `residual` updated
    in place to r (vLLM's fused_add_rms_norm)."""
    if x.dim() == 2 and x.stride(-1) == 1 and _fused(x) and weight.dtype == x.dtype:
        return ops().rms_norm(x, residual, weight, eps)
    return rms_norm_torch(x, weight, eps, residual)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotation of Hugging Face Llama checkpoints, in place on x [T, H, D]
    (a view into the fused qkv output is fine); cos, sin [T, D/2] float32. Returns x."""
    if x.stride(-1) == 1 and _fused(x) and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous():
        ops().rope_(x, cos, sin)
        return x
    x.copy_(rope_torch(x, cos, sin))
    return x


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2I] gate/up projection output."""
    if x.dim() == 2 and x.stride(-1) == 1 and _fused(x):
        return ops().silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a decode step's few rows on CPU go through the compiled small-row GEMM
    (csrc/small_gemm.cpp), which streams each weight once at the read bandwidth."""
    if (x.dim() == 2 and x.shape[0] <= SMALL_GEMM_MAX_ROWS and x.stride(-1) == 1 and _fused(x)
            and weight.dtype == x.dtype and weight.is_contiguous() and weight.device.type == "cpu"):
        return ops().small_gemm(x, weight, bias)
    return F.linear(x, weight, bias)
