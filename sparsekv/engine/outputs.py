"""What the engine hands back, shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SparsityStats:
    """Fractions of causal (query, key) pairs attended, averaged over layers and heads."""

    prefill_attended: int = 0
    prefill_total: int = 0
    decode_attended: int = 0
    decode_total: int = 0
    kv_bytes_fraction: float = 1.0

    def add(self, phase: str, attended: int, total: int) -> None:
        if phase == "prefill":
            self.prefill_attended += attended
            self.prefill_total += total
        else:
            self.decode_attended += attended
            self.decode_total += total

    @property
    def prefill_attended_fraction(self) -> float | None:
        return self.prefill_attended / self.prefill_total if self.prefill_total else None

    @property
    def decode_attended_fraction(self) -> float | None:
        return self.decode_attended / self.decode_total if self.decode_total else None

    def as_dict(self) -> dict[str, float | None]:
        return {"prefill_attended_fraction": self.prefill_attended_fraction,
                "decode_attended_fraction": self.decode_attended_fraction,
                "kv_bytes_fraction": self.kv_bytes_fraction}


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def prefill_seconds(self) -> float:
        if self.first_token_time is None or self.first_scheduled_time is None:
            return 0.0
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_seconds(self) -> float:
        if self.finished_time is None or self.first_token_time is None:
            return 0.0
        return self.finished_time - self.first_token_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob} (top-N + chosen)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    sparsity: SparsityStats = field(default_factory=SparsityStats)
    num_cached_tokens: int = 0
