"""Rotary position embeddings with the Hugging Face rope scalings: default, linear, llama3, yarn and
dynamic (NTK). Each follows transformers' `modeling_rope_utils` so logits match it.

`dynamic` is the one whose frequencies depend on the sequence: transformers recomputes `inv_freq`
in every forward pass from `seq_len = max(position) + 1` (never below `max_position_embeddings`),
and keys already in the KV cache keep the rotation of the step that computed them. We do the same
per sequence and per step: a sequence's tokens in a step use the frequencies of its context length
after that step, and a prompt's chunks (longer than max_num_batched_tokens) all use the whole
prompt's length (AttnMetadata.rope_lens_cpu), as transformers' single forward over the prompt
does. A prompt prefilled in chunks and then decoded token by token therefore matches it exactly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparsekv.engine.models.llama import ModelArgs

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_type(args: "ModelArgs") -> str:
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return kind


def _base_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(args: "ModelArgs") -> torch.Tensor:
    """Inverse frequencies [head_dim / 2]; for `dynamic`, those of sequences up to max_position_embeddings."""
    d, sc, kind = args.head_dim, args.rope_scaling or {}, rope_type(args)
    inv = _base_inv_freq(args.rope_theta, d)
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "yarn":
        inv = _yarn_inv_freq(args)
    return inv


def _yarn_inv_freq(args: "ModelArgs") -> torch.Tensor:
    """NTK-by-parts: interpolate the low frequencies by `factor`, keep the high ones, ramp between."""
    d, sc, base = args.head_dim, args.rope_scaling, args.rope_theta
    factor = sc["factor"]
    old = sc.get("original_max_position_embeddings") or args.max_position_embeddings
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (d * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_scaling(args: "ModelArgs") -> float:
    """YaRN's mscale (cos and sin are multiplied by it, as transformers does); 1 for the others."""
    if rope_type(args) != "yarn":
        return 1.0
    sc = args.rope_scaling
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return mscale(sc["factor"], sc["mscale"]) / mscale(sc["factor"], sc["mscale_all_dim"])
    return mscale(sc["factor"])


def rope_max_len(args: "ModelArgs") -> int:
    """The context the scaling makes usable, as vLLM derives max_model_len from it."""
    sc, kind = args.rope_scaling or {}, rope_type(args)
    if kind == "yarn":
        old = sc.get("original_max_position_embeddings") or args.max_position_embeddings
        return int(sc["factor"] * old)
    if kind in ("linear", "dynamic"):
        return int(sc["factor"] * args.max_position_embeddings)
    return args.max_position_embeddings


def dynamic_inv_freq(args: "ModelArgs", seq_len: int) -> torch.Tensor:
    """transformers' dynamic NTK frequencies for a sequence of `seq_len` tokens (same float32 steps)."""
    d, factor, old = args.head_dim, args.rope_scaling["factor"], args.max_position_embeddings
    n = torch.maximum(torch.tensor(seq_len), torch.tensor(old))
    base = args.rope_theta * ((factor * n / old) - (factor - 1)) ** (d / (d - 2))
    return _base_inv_freq(base, d)


def rope_cos_sin(args: "ModelArgs", inv_freq: torch.Tensor, positions: torch.Tensor,
                 seq_lens: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] for the step's tokens. `seq_lens`: (tokens in this step, context length
    after it) per sequence, in token order; only `dynamic` reads it."""
    if rope_type(args) == "dynamic" and any(n > args.max_position_embeddings for _, n in seq_lens):
        counts = torch.tensor([q for q, _ in seq_lens], device=positions.device)
        per_seq = torch.stack([dynamic_inv_freq(args, n) for _, n in seq_lens]).to(positions.device)
        inv = per_seq.repeat_interleave(counts, dim=0)
    else:
        inv = inv_freq.unsqueeze(0)
    freqs = positions.float().unsqueeze(1) * inv
    scale = rope_attention_scaling(args)
    return freqs.cos() * scale, freqs.sin() * scale

