"""Running many small independent torch ops on a CPU without OpenMP barrier stalls."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}


def run_streams(tasks: list[Callable[[], None]]) -> None:
    """Run independent torch tasks on torch.get_num_threads() Python threads of one intra-op thread each.

    Thousands of small ops on a shared, busy CPU lose most of their time at OpenMP barriers (one
    thread of the team is descheduled and the others wait for it); single-threaded streams that
    pick tasks as they free up do not. Intra-op threads are set to 1 only for this call.
    """
    n = torch.get_num_threads()
    if n == 1 or len(tasks) < 2:
        for task in tasks:
            task()
        return
    pool = _POOLS.get(n) or _POOLS.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="sparsekv-cpu"))
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers must share the caller's

    def in_mode(task: Callable[[], None]) -> None:
        with torch.inference_mode(inference):
            task()

    torch.set_num_threads(1)  # workers start (and stay) single-threaded
    try:
        for future in [pool.submit(in_mode, task) for task in tasks]:
            future.result()
    finally:
        torch.set_num_threads(n)

