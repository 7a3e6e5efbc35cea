"""Which context lengths an eval runs: the ones the model supports, per task.

A prompt plus its generation budget must fit the model's context (as RULER sizes its prompts),
so an 8K model gets its "8K" cell clipped by the task's answer budget, and asking for 16K on it
is skipped with a log line unless a rope scaling override stretches the context.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def model_max_len(model: str, hf_overrides: dict[str, Any] | None = None) -> int:
    """The context the model supports: max_position_embeddings, or a scaled rope's length, as
    the engine derives its default max_model_len."""
    from sparsekv.engine.loader import read_config
    from sparsekv.engine.models.llama import ModelArgs
    from sparsekv.engine.models.rope import rope_max_len

    return rope_max_len(ModelArgs.from_hf(read_config(model, hf_overrides)))


def rope_override(hf_overrides: dict[str, Any] | None) -> bool:
    return bool((hf_overrides or {}).get("rope_scaling"))


def cells(tasks: list[str], lengths: list[int] | None, budgets: dict[str, int], limit: int,
          explicit_rope: bool) -> list[tuple[str, int]]:
    """(task, prompt length) pairs to run; `lengths` None means RULER's lengths up to `limit`.

    A length up to `limit` whose prompt + answer budget does not fit is clipped to what every
    task fits (one column for all tasks), so "8K" on an 8K model runs; a length beyond `limit`
    is skipped, unless a rope override was given: then the user knowingly runs past the
    model's own context. Both are logged."""
    room = limit - max(budgets[t] for t in tasks)
    wanted = lengths if lengths is not None else [n for n in RULER_LENGTHS if n <= limit] or [limit]
    out = []
    for n in dict.fromkeys(wanted):
        if n > limit and not explicit_rope:
            log.warning("skipping length %d: it exceeds the model's %d-token context (a rope scaling override, "
                        "e.g. --hf-overrides '{\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2.0}}', "
                        "runs it)", n, limit)
            continue
        fits = explicit_rope or all(n + budgets[t] <= limit for t in tasks)
        if not fits:
            log.info("length %d clipped to %d so that prompts and answers (up to %d tokens) fit the model's "
                     "%d-token context", n, room, limit - room, limit)
        out += [(t, n if fits else room) for t in tasks]
    return sorted(dict.fromkeys(out), key=lambda c: tasks.index(c[0]))
