"""AsyncEngine: the LLMEngine step loop in its own thread, streamed to asyncio callers.

LLMEngine is not thread-safe, so only the engine thread ever calls it: the event loop sends
commands (add, abort) through a queue, and every step's outputs go back to per-request asyncio
queues at once, which is what lets the HTTP server stream tokens as they are produced.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sparsekv.config import EngineConfig
from sparsekv.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sparsekv.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_STOP = object()


class EngineOverloaded(RuntimeError):
    """Too many requests wait already; the client should retry later."""


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or has died."""


class EngineError(RuntimeError):
    """The engine failed while running the request."""


class RequestGroup:
    """Outputs of the engine requests one API call made (one per prompt), as (index, output).

    Iterating yields outputs as steps produce them; `close()` aborts whatever has not finished,
    so a caller that stops listening (client gone, error) frees the pages at once.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.unfinished = set(range(len(request_ids)))
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    def __aiter__(self) -> "RequestGroup":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()  # the engine thread has already dropped these requests
            raise item
        index, output = item
        if output.finished:
            self.unfinished.discard(index)
        return index, output

    def close(self) -> None:
        if self.unfinished:
            self._engine.abort([self.request_ids[i] for i in self.unfinished])
            self.unfinished.clear()


@dataclass
class _Tracked:
    """What the engine thread keeps per request: where outputs go, and enough to end it."""

    group: RequestGroup
    index: int
    prompt_ids: list[int]
    n: int
    last: RequestOutput | None = None


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it."""

    def __init__(self, config: EngineConfig, max_waiting_requests: int | None = None) -> None:
        from sparsekv.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config)
        self.config = self.engine.config
        self.model_name: str = self.engine.model_name
        # The API encodes prompts on the event loop while the engine thread decodes; a Rust
        # tokenizer object must not be used by two threads at once, so the API gets its own.
        self.tokenizer = copy.deepcopy(self.engine.tokenizer)
        self.max_waiting_requests = max_waiting_requests
        self.accepting = True
        self.error: str | None = None  # set when the engine thread died
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._lock = threading.Lock()  # guards _stats and _pending together
        self._stats = self.engine.stats()
        self._pending = 0  # sequences queued for the engine thread but not yet added
        self._thread = threading.Thread(target=self._run, name="sparsekv-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self):
        """The engine's stats after its latest step (a snapshot; safe from any thread)."""
        with self._lock:
            return self._stats

    async def add_requests(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                           sparsity: dict[str, Any] | None = None) -> RequestGroup:
        """Admit all prompts or none. Raises ValueError (invalid input), EngineOverloaded or
        EngineUnavailable; returns the group whose iteration streams their outputs."""
        if not self.healthy:
            raise EngineUnavailable(f"the engine is not running: {self.error or 'stopped'}")
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down")
        seqs = len(prompts) * params.n  # the engine's waiting queue holds sequences
        with self._lock:
            waiting = self._stats.num_waiting + self._pending
            if self.max_waiting_requests is not None and waiting + seqs > self.max_waiting_requests:
                raise EngineOverloaded(f"{waiting} requests are waiting already (limit "
                                       f"{self.max_waiting_requests}); retry later")
            self._pending += seqs
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        group = RequestGroup(self, ids)
        done: Future = Future()
        self._commands.put(("add", group, prompts, params, sparsity, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(ids)  # queued after the add, so it undoes it
            raise
        return group

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Stop admitting now; abort what still runs after the grace period (any thread)."""
        self.accepting = False
        timer = threading.Timer(grace_seconds, self._commands.put, args=(("abort_all",),))
        timer.daemon = True
        timer.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the engine thread."""
        self.accepting = False
        self._commands.put(("abort_all",))
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
        except Exception as e:  # a broken engine must fail requests, not hang them
            logger.exception("engine thread died")
            self.error = repr(e)
            self._fail_all(EngineUnavailable(f"the engine died: {e!r}"))

    def _handle_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one if idle); False once told to stop."""
        added = handled = 0
        try:
            command = self._commands.get(block=block)
            while True:
                if command is _STOP:
                    self._abort_all()
                    return False
                added += self._handle(command)
                handled += 1
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        finally:
            if handled:
                self._update_stats(added)
        return True

    def _update_stats(self, added: int = 0) -> None:
        with self._lock:
            self._pending -= added
            self._stats = self.engine.stats()

    def _handle(self, command: tuple) -> int:
        kind, *rest = command
        if kind == "add":
            group, prompts, params, sparsity, done = rest
            try:
                for index, (request_id, prompt) in enumerate(zip(group.request_ids, prompts)):
                    if request_id in self._tracked:
                        raise ValueError(f"request id {request_id!r} is already running")
                    self.engine.add_request(request_id, prompt, params, sparsity)
                    self._tracked[request_id] = _Tracked(group, index, list(prompt), params.n)
                done.set_result(None)
            except Exception as e:
                self._abort(group.request_ids, notify=False)
                done.set_exception(e)
            return len(prompts) * params.n
        if kind == "abort":
            self._abort(rest[0], notify=False)
        elif kind == "abort_all":
            self._abort_all()
        return 0

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineError(f"the engine failed: {e!r}"))
            self._update_stats()
            return
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            tracked.last = output
            tracked.group.put((tracked.index, output))
            if output.finished:
                del self._tracked[output.request_id]
        self._update_stats()

    def _abort(self, request_ids: list[str], notify: bool) -> None:
        """Free the requests' pages; with notify, end their streams with finish_reason abort."""
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            self.engine.abort_request(request_id)
            if notify:
                tracked.group.put((tracked.index, _aborted(request_id, tracked)))

    def _abort_all(self) -> None:
        if self._tracked:
            logger.info("aborting %d requests still in flight", len(self._tracked))
        self._abort(list(self._tracked), notify=True)

    def _fail_all(self, error: Exception) -> None:
        groups = {id(t.group): t.group for t in self._tracked.values()}
        try:
            self._abort(list(self._tracked), notify=False)
        except Exception:
            logger.exception("could not abort the failed requests")
            self.error = self.error or "abort failed after an engine error"
            self._tracked.clear()
        for group in groups.values():
            group.put(error)


def _aborted(request_id: str, tracked: _Tracked) -> RequestOutput:
    """The final output of a request the server aborted: what it had, ended with `abort`."""
    last = tracked.last
    if last is None:
        outputs = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(tracked.n)]
        return RequestOutput(request_id, None, tracked.prompt_ids, outputs, True, RequestMetrics(time.time()))
    outputs = [o if o.finished else dataclasses.replace(o, finish_reason="abort") for o in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)
