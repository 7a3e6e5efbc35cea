"""The benchmarks' one timer: warm-up calls, then wall times of `repeats` calls."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timings_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return statistics.median(timings_s(fn, repeats, warmup))
