"""One model for the Llama family: Llama 2/3, Qwen2 (qkv bias), Qwen3 (q/k norm), Mistral.

Parameter names follow the Hugging Face checkpoints so weights load without renaming. The
attention layer writes new K/V into the paged cache and hands attention to the backends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekv.attention.backend import AttnBatch, BackendParams, SeqAttn, get_backend
from sparsekv.cache.kv_cache import KVCache
from sparsekv.engine.models.rope import apply_rope, rope_cos_sin, rope_inv_freq
from sparsekv.engine.outputs import SparsityStats

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class SeqContext:
    """A sequence's place in the step: the attention layers turn it into SeqAttn per group."""

    q_start: int
    q_len: int
    context_len: int
    block_table: torch.Tensor
    page_runs: tuple[tuple[int, int], ...]  # see SeqAttn.page_runs
    phase: str
    routes: list[tuple[str, BackendParams]]  # backend per layer
    state: dict
    stats: SparsityStats


@dataclass
class ForwardContext:
    kv_cache: KVCache
    slots: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    seqs: list[SeqContext] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.num_layers = layer, args.num_layers
        self.h, self.hkv, self.d = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.h * self.d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.hkv * self.d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.hkv * self.d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.d, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.h, self.d)
        k = self.k_proj(x).view(t, self.hkv, self.d)
        v = self.v_proj(x).view(t, self.hkv, self.d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        ctx.kv_cache.write(self.layer, k, v, ctx.slots)
        return self.o_proj(self._attend(q, ctx).reshape(t, self.h * self.d))

    def _attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Group sequences by (phase, backend) and run each group's backend on its rows."""
        groups: dict[tuple, list[SeqContext]] = {}
        for s in ctx.seqs:
            groups.setdefault((s.phase, *s.routes[self.layer]), []).append(s)
        kv = ctx.kv_cache.layers[self.layer]
        whole = len(groups) == 1  # the common case: no row gather or scatter
        out = None if whole else torch.empty_like(q)
        for (phase, name, params), members in groups.items():
            attn, start = [], 0
            for s in members:
                attn.append(SeqAttn(q_start=s.q_start if whole else start, q_len=s.q_len,
                                    context_len=s.context_len, block_table=s.block_table, state=s.state,
                                    page_runs=s.page_runs))
                start += s.q_len
            batch = AttnBatch(phase=phase, layer=self.layer, num_layers=self.num_layers, scale=self.scale, seqs=attn)
            backend = get_backend(name, params)
            if whole:
                out = backend.forward(q, kv, batch)
            else:
                rows = torch.cat([torch.arange(s.q_start, s.q_start + s.q_len) for s in members])
                out[rows] = backend.forward(q[rows], kv, batch)
            for s, a in zip(members, attn):
                s.stats.add(phase, a.attended, a.causal_pairs * self.h)
        return out


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(args)  # rebuilt by the loader on the model's device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        seq_lens = [(s.q_len, s.context_len) for s in ctx.seqs]
        ctx.cos, ctx.sin = rope_cos_sin(self.args, self.inv_freq, positions, seq_lens)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
