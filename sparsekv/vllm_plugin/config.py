"""The plugin's SparsityConfig and what it refuses, read without importing vLLM.

vLLM loads general plugins in every process (API server, engine core, each worker), so the
config comes from the environment, which they all inherit, rather than from vLLM's arguments.
"""
from __future__ import annotations

import json
import os
from typing import Any

from sparsekv.config import SparsityConfig, preset

ENV = "SPARSEKV_SPARSITY_CONFIG"  # a preset name, a SparsityConfig JSON file, or inline JSON
STATS_ENV = "SPARSEKV_VLLM_STATS"  # a JSON file each worker rewrites with its attended fraction


def enabled() -> bool:
    """The plugin replaces vLLM's attention only when asked to: with sparsekv installed beside
    vLLM but the variable unset, vLLM runs exactly as without it."""
    return bool(os.environ.get(ENV))


def stats_path() -> str | None:
    return os.environ.get(STATS_ENV) or None


def load_sparsity(value: str | None = None) -> SparsityConfig:
    """The config named by `value` (default: $SPARSEKV_SPARSITY_CONFIG). Raises ValueError, with
    pydantic's reasons, for a bad one: vLLM then fails at start-up, not at the first request."""
    value = (value if value is not None else os.environ.get(ENV, "")).strip()
    if not value:
        return SparsityConfig()
    if value.startswith("{"):
        return SparsityConfig.model_validate(json.loads(value))
    return preset(value)


def refuse_unsupported(parallel: Any) -> None:
    """Raise at start-up for what a per-rank selection cannot do right. Context parallelism
    shards a sequence's keys over ranks, so each rank would pick its top pages from a part of
    the context: not the method. Tensor and pipeline parallelism are fine (whole sequences of
    a rank's own heads or layers); data parallel replicas are independent engines."""
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, name, 1) or 1
        if size > 1:
            raise ValueError(f"sparsekv's vLLM plugin does not support context parallelism ({name}={size}): "
                             f"sparse selection needs a request's whole context on one rank; unset {ENV} "
                             "to run vLLM's own attention")


MLA_REFUSED = (f"sparsekv's vLLM plugin does not support MLA models (DeepSeek-V2/V3 style latent KV): "
               f"its methods score ordinary per-head keys; unset {ENV} to run vLLM's own MLA attention")
