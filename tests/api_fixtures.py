"""Fixtures for the API tests: a real `sparsekv serve` subprocess, clients, offline references.

Test modules load this with `pytest_plugins = ["api_fixtures"]`, which registers it once, so
the session server starts once for all of them (an imported fixture would start one per module).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tiny_model import WORDS

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_prompts(count: int, seed: int = 0, words: tuple[int, int] = (3, 30)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(count)]


@pytest.fixture(scope="session")
def api_server(tiny_llama, tmp_path_factory):
    """Base URL of `sparsekv serve` on the tiny model; SIGTERM at the end must exit cleanly."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "sparsekv.cli", "serve", "--model", tiny_llama, "--port", str(port),
           "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
           "--max-num-seqs", "64", "--api-key", API_KEY, "--max-request-body-bytes", str(2**20),
           "--shutdown-timeout", "2"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, timeout=180, interval=0.25), log_path.read_text()[-3000:]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 30 s"
    # uvicorn re-raises the signal it handled once shut down, so -SIGTERM is a normal exit here
    log_text = log_path.read_text()
    assert code in (0, -signal.SIGTERM) and "shut down cleanly" in log_text, f"({code}):\n{log_text[-3000:]}"


@pytest.fixture(scope="session")
def http(api_server):
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def client(api_server):
    import openai

    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def async_client_factory(api_server):
    """AsyncOpenAI clients bind to the running loop, so each asyncio.run makes its own."""
    import openai

    return lambda: openai.AsyncOpenAI(base_url=f"{api_server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def offline(tiny_llama):
    """The offline engine on the same checkpoint: what temperature-0 serving must reproduce."""
    from sparsekv import LLM

    return LLM(tiny_llama, max_model_len=MAX_MODEL_LEN, dtype="float32", max_num_seqs=64)


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """Sum of the samples of `sparsekv:<name>` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == f"sparsekv:{name}" and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def pool_idle(http: httpx.Client) -> bool:
    return (metric(http, "num_requests_running") == 0 and metric(http, "num_requests_waiting") == 0
            and metric(http, "kv_cache_usage_perc") == 0)


@contextlib.contextmanager
def thread_server(model: str, max_waiting_requests: int | None = None, shutdown_timeout: float = 2.0,
                  **engine_args):
    """An in-process server (uvicorn in a thread) for tests that need their own engine."""
    from sparsekv.api.server import create_app, make_server
    from sparsekv.config import EngineConfig
    from sparsekv.engine.async_engine import AsyncEngine

    config = EngineConfig(model=model, max_model_len=MAX_MODEL_LEN, dtype="float32", **engine_args)
    engine = AsyncEngine(config, max_waiting_requests=max_waiting_requests)
    server = make_server(create_app(engine), "127.0.0.1", free_port(), shutdown_timeout)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=30)
        yield f"http://127.0.0.1:{server.config.port}", server, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
