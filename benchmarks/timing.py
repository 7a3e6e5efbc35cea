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


def interleaved_s(fn: Callable[[], object], baseline: Callable[[], object], repeats: int) -> dict[str, list[float]]:
    """Wall and this thread's CPU times of fn and of baseline taken in turn, so both see the same
    load on a shared host; with one thread the CPU times also leave out time spent descheduled."""
    fn(), baseline()
    times: dict[str, list[float]] = {"wall": [], "cpu": [], "base_wall": [], "base_cpu": []}
    for _ in range(repeats):
        for f, prefix in ((fn, ""), (baseline, "base_")):
            wall, cpu = time.perf_counter(), time.thread_time()
            f()
            times[prefix + "cpu"].append(time.thread_time() - cpu)
            times[prefix + "wall"].append(time.perf_counter() - wall)
    return times
