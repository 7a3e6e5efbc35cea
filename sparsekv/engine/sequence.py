"""A sequence: one completion of a request, with its tokens, pages and progress."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from sparsekv.config import SparsityConfig
from sparsekv.engine.outputs import RequestMetrics, SparsityStats
from sparsekv.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


def prefill_salt(sparsity: SparsityConfig) -> str:
    """What a prompt page's K/V depend on, so requests share prompt pages only where it matches:
    how prefill attended (sparse layers change later layers' K/V) and the KV format; eviction
    runs after the prompt's dense K/V are stored, so it does not change them."""
    return sparsity.model_dump_json(include={"prefill", "kv", "dense_layers", "min_context"},
                                    exclude={"kv": {"evict", "budget", "evict_params"}})


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    params: SamplingParams
    sparsity: SparsityConfig
    prompt: str | None = None
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0
    num_evicted_tokens: int = 0  # computed tokens whose K/V eviction dropped (KV slots = computed - evicted)
    num_unread_slots: float = 0.0  # KV slots held but not read, mean over (layer, KV head) rows (PyramidKV/AdaKV)
    cache_salt: int = field(init=False)  # prompt pages are shared only under equal prefill sparsity
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None  # request slot while running (backend state is indexed by it)
    stats: SparsityStats = field(default_factory=SparsityStats)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    generator: torch.Generator | None = None
    text: str = ""  # visible output text (stop strings applied, partial matches held back)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.cache_salt = hash(prefill_salt(self.sparsity))
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def chunk_limit(self, cached: int = 0) -> int:
        """Most tokens the next step may compute (after `cached` prefix-cache hits). An evicting
        sequence recomputed after preemption replays as it first ran: its prompt, then one token
        a step, so it evicts at the same points and ends with the same KV."""
        done = self.num_computed_tokens + cached
        if self.sparsity.kv.evict == "none":
            return self.num_tokens - done
        return self.num_prompt_tokens - done if done < self.num_prompt_tokens else 1

    @property
    def prefix_hit_limit(self) -> int:
        """Leading prompt tokens the prefix cache may supply. An evicting method scores with the
        prompt's last queries (H2O all of them, SnapKV's family its window): cached pages would
        skip those rows, so they are computed (their pages are still cached for others)."""
        evict = self.sparsity.kv.eviction()
        return self.num_prompt_tokens - (evict.observed_queries(self.num_prompt_tokens) if evict else 0)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
