"""One model for the Llama family: Llama 2/3, Qwen2 (qkv bias), Qwen3 (q/k norm), Mistral.

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are fused
(`fuse_checkpoint`). Attention and the FFN go through the seams in sparsekv.attention.context
and sparsekv.ffn: this file holds no routing code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekv.attention.context import Attention, get_forward_context
from sparsekv.attention.kernels.cpu_ops import linear, rms_norm, rope_
from sparsekv.engine.models.rope import rope_cos_sin, rope_inv_freq
from sparsekv.ffn.backend import routed_ffn, routed_linear

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "llama")
        rope_params = cfg.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        rope_scaling = cfg.get("rope_scaling") or rope_params or None
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta")
                             or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=rope_scaling, max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of x, or of residual + x with `residual` updated in place to that sum."""
        return rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Linear):
    """nn.Linear whose decode-sized inputs take the compiled small-row GEMM on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LlamaAttention(nn.Module):
    """q/k/v projections and rope; attention itself is the seam's job."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.h, self.hkv, self.d = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = Linear(args.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=args.qkv_bias)
        self.o_proj = Linear(self.h * self.d, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.d, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.layer = layer
        self.attn = Attention(layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = routed_linear(self.qkv_proj, x, self.layer, "qkv")
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(t, self.h, self.d), k.view(t, self.hkv, self.d), v.view(t, self.hkv, self.d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_(q, cos, sin), rope_(k, cos, sin)
        return routed_linear(self.o_proj, self.attn(q, k, v).reshape(t, self.h * self.d), self.layer, "o")


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routed_ffn(self, x, self.layer)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(args, layer)
        self.mlp = MLP(args, layer)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds the two,
        so each residual add is fused into a norm (as vLLM's layers do)."""
        if residual is None:
            residual = x.clone()
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


# checkpoint tensors that are slices of one fused parameter: (fused suffix, [checkpoint suffixes])
STACKED = (("qkv_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
           ("qkv_proj.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias")),
           ("gate_up_proj.weight", ("gate_proj.weight", "up_proj.weight")))


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(args)  # rebuilt by the loader on the model's device

    @staticmethod
    def fuse_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face tensor names -> this model's, concatenating the slices of fused
        projections (one GEMM for q/k/v and one for gate/up: fewer, larger reads per step)."""
        out = dict(tensors)
        for fused, parts in STACKED:
            for name in [n for n in tensors if n.endswith(parts[0])]:
                prefix = name[:-len(parts[0])]
                names = [prefix + p for p in parts]
                if all(n in out for n in names):
                    out[prefix + fused] = torch.cat([out.pop(n) for n in names])
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context().meta
        cos, sin = rope_cos_sin(self.args, self.inv_freq, positions, list(zip(meta.q_lens_cpu, meta.rope_lens_cpu)))
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.model.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
