"""RULER's scoring: case-insensitive substring match of the reference strings in the output."""
from __future__ import annotations

import re
from typing import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    """As RULER post-processes predictions: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of the references found (1.0 when all are there); the metric of every synthetic task."""
    text = clean(prediction).lower()
    return sum(r.lower() in text for r in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found (RULER's QA metric)."""
    text = clean(prediction).lower()
    return float(any(r.lower() in text for r in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score in [0, 100], as RULER reports it."""
    return 100.0 * METRICS[metric](prediction, references)
