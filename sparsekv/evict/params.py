"""Token-eviction methods' parameters (the papers' defaults and ranges) and their budgets.

`kv.budget` is C, the tokens a sequence keeps per layer and KV head (sinks and the recent or
observation window included); without it each method falls back to its paper's default size.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class EvictParams(BaseModel):
    """Common to every method: the `n_sink` first tokens and the newest ones (how many is the
    method's rule) are never evicted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    one_shot: ClassVar[bool] = False  # True: evict once, at the end of the prompt (SnapKV family)
    default_budget: ClassVar[int] = 2048
    n_sink: int = Field(0, ge=0)

    def capacity(self, budget: int | None, prompt_len: int) -> int:
        return self.default_budget if budget is None else budget

    def check_budget(self, budget: int | None) -> None:
        """The protected tokens must fit the budget, or eviction could never meet it."""
        c = self.capacity(budget, 0)
        if c <= self.n_sink or c < self.n_sink + self.protected_recent(c):
            raise ValueError(f"kv.budget {c} is smaller than n_sink + window ({self.n_sink} + "
                             f"{self.protected_recent(c)})")

    def protected_recent(self, capacity: int) -> int:
        """How many of the newest tokens are never evicted."""
        raise NotImplementedError

    def observed_queries(self, prompt_len: int) -> int:
        """How many of the prompt's last queries the scores read: those rows must be computed,
        not taken from the prefix cache, or the kept tokens would depend on the cache's state."""
        return 0

    def row_budgets(self, capacity: int, scores: torch.Tensor, free: torch.Tensor, protected: int) -> torch.Tensor:
        """int64 [L, Hkv]: tokens each (layer, KV head) keeps, protected ones included, from the
        scores and evictable mask [L, Hkv, K]; uniform unless a method shapes it."""
        return torch.full(scores.shape[:2], capacity, dtype=torch.long)


class StreamingLLMParams(EvictParams):
    """StreamingLLM: 4 attention sinks plus a sliding window (the class default recent_size 512).
    K is cached after RoPE here, so kept tokens keep their original positions (pos_shift=False:
    the paper's position shift needs K cached before RoPE)."""

    default_budget: ClassVar[int] = 516
    n_sink: int = Field(4, ge=0)
    pos_shift: Literal[False] = False

    def protected_recent(self, capacity: int) -> int:
        return capacity - self.n_sink  # everything but the sinks is the window


class H2OParams(EvictParams):
    """H2O: heavy hitters by accumulated attention plus the recent tokens. With kv.budget the
    budget splits heavy:recent as heavy_ratio:recent_ratio; without it the ratios are of the
    prompt length (the paper's 0.1 / 0.1)."""

    heavy_ratio: float = Field(0.1, gt=0.0, le=1.0)
    recent_ratio: float = Field(0.1, gt=0.0, le=1.0)

    def capacity(self, budget: int | None, prompt_len: int) -> int:
        if budget is not None:
            return budget
        return max(1, math.ceil((self.heavy_ratio + self.recent_ratio) * prompt_len))

    def protected_recent(self, capacity: int) -> int:
        return math.floor(capacity * self.recent_ratio / (self.heavy_ratio + self.recent_ratio))

    def observed_queries(self, prompt_len: int) -> int:
        return prompt_len  # every query's attention mass accumulates


class SnapKVParams(EvictParams):
    """SnapKV: the last `window` prompt queries score the prefix; scores pooled along tokens;
    per KV head top (C - window) plus the window (LongBench config: w 32, kernel 7, max pool)."""

    one_shot: ClassVar[bool] = True
    window: int = Field(32, ge=1)
    pool_kernel: int = Field(7, ge=1)
    pool: Literal["max", "avg"] = "max"
    gqa: Literal["mean", "max"] = "mean"

    def protected_recent(self, capacity: int) -> int:
        return self.window

    def observed_queries(self, prompt_len: int) -> int:
        return self.window

    @model_validator(mode="after")
    def _odd_kernel(self) -> "SnapKVParams":
        if self.pool_kernel % 2 == 0:
            raise ValueError("pool_kernel must be odd (same-length pooling)")
        return self


class PyramidKVParams(SnapKVParams):
    """PyramidKV: SnapKV scoring with layer budgets falling linearly from max_num (layer 0) to
    min_num = (C - w) / beta (last layer), mean C - w (KVCache-Factory: w 8, kernel 7, max pool)."""

    window: int = Field(8, ge=1)
    beta: float = Field(20.0, gt=1.0)

    def row_budgets(self, capacity, scores, free, protected):
        per_layer = pyramid_budgets(capacity - protected, self.beta, scores.shape[0]) + protected
        return per_layer.view(-1, 1).expand(scores.shape[:2]).clone()


class AdaKVParams(SnapKVParams):
    """Ada-KV: one budget per layer, shared across its KV heads by score: each head keeps
    floor_alpha of the fair share, the rest goes to the layer's top scores over all heads."""

    floor_alpha: float = Field(0.2, ge=0.0, le=1.0)

    def row_budgets(self, capacity, scores, free, protected):
        return ada_budgets(scores, free, capacity - protected, self.floor_alpha) + protected


def pyramid_budgets(mean: int, beta: float, num_layers: int) -> torch.Tensor:
    """Per-layer budgets, a linear fall from max_num to min_num summing to L * mean."""
    if num_layers == 1:
        return torch.tensor([mean])
    lo = mean / beta
    hi = 2 * mean - lo
    raw = torch.tensor([hi - (hi - lo) * i / (num_layers - 1) for i in range(num_layers)])
    out = raw.floor().long()
    rest = num_layers * mean - int(out.sum())  # the remainder to the top layers keeps the sum exact
    out[:rest] += 1
    return out


def ada_budgets(scores: torch.Tensor, free: torch.Tensor, share: int, floor_alpha: float) -> torch.Tensor:
    """scores, free [L, Hkv, K] -> evictable tokens kept per head [L, Hkv], Hkv * share per layer:
    each head's own top floor_alpha * share first, the rest to the layer's best scores left."""
    L, H, K = scores.shape
    floor = int(share * floor_alpha)
    s = scores.masked_fill(~free, float("-inf")).sort(dim=-1, descending=True).values
    base = free.sum(-1).clamp(max=floor)
    rest = s.clone()
    rest[..., :floor] = float("-inf")  # the floor picks are taken already
    extra = max(0, min(H * (share - floor), H * K))
    top = rest.flatten(1).topk(extra, dim=1)
    heads = torch.div(top.indices, K, rounding_mode="floor").masked_fill(top.values == float("-inf"), H)
    counts = torch.zeros(L, H + 1, dtype=torch.long).scatter_add_(1, heads, torch.ones_like(heads))
    return base + counts[:, :H]


EVICT_METHODS: dict[str, type[EvictParams]] = {
    "streamingllm": StreamingLLMParams, "h2o": H2OParams, "snapkv": SnapKVParams,
    "pyramidkv": PyramidKVParams, "adakv": AdaKVParams,
}


def evict_params(method: str, params: dict) -> EvictParams:
    if method not in EVICT_METHODS:
        raise ValueError(f"kv.evict {method!r} is not available; known: none, {', '.join(EVICT_METHODS)}")
    return EVICT_METHODS[method](**params)
