"""Run requests together through engine.step(), the way the server's engine thread does."""
from __future__ import annotations

from typing import Callable


def run_together(engine, requests: dict[str, tuple], params, each: Callable = lambda engine: None) -> dict:
    """requests: id -> (prompt, sparsity or None), all added before the first step; each(engine)
    runs after every step. Returns id -> the finished request's first CompletionOutput."""
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, params, sp)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0]
        each(engine)
    return got
