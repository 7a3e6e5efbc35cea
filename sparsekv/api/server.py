"""`sparsekv serve`: the OpenAI-compatible HTTP server (FastAPI app factory + CLI).

Routes and flags follow vLLM's so that switching is a matter of the command name. FastAPI is
imported inside the functions because `sparsekv --help` imports every subcommand module.
"""
import argparse
import contextlib
import logging
import time
from importlib.metadata import PackageNotFoundError, version

from sparsekv.cli import add_engine_arguments, engine_config_from_args

logger = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return version("sparsekv")
    except PackageNotFoundError:
        return "unknown"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory's name)")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="beyond this many waiting sequences (requests x n), new requests get 429")
    g.add_argument("--max-request-body-bytes", type=int, default=32 * 2**20)
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGTERM before they are aborted")
    g.add_argument("--uvicorn-log-level", default="warning")


def create_app(engine, api_key: str | None = None, max_body_bytes: int = 32 * 2**20):
    """The app over a running AsyncEngine; the engine is shut down with the app."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from sparsekv.api.errors import error_response, install_error_handlers
    from sparsekv.api.handlers import Serving
    from sparsekv.api.metrics import Metrics
    from sparsekv.api.middleware import GuardMiddleware
    from sparsekv.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()
        logger.info("engine stopped; shut down cleanly")

    app = FastAPI(title="sparsekv", version=package_version(), lifespan=lifespan)
    metrics = Metrics(engine.model_name, engine.stats)
    serving = Serving(engine, metrics)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "sparsekv",
                "root": engine.config.model, "parent": None, "max_model_len": engine.config.max_model_len}

    @app.get("/health")
    async def health() -> Response:
        if not engine.healthy:
            return error_response(503, f"the engine is not running: {engine.error or 'stopped'}")
        if not engine.accepting:
            return error_response(503, "the server is shutting down")
        return Response(status_code=200)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": package_version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        serving.check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        return serving.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        return serving.detokenize(req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(req, raw)

    return app


def make_server(app, host: str, port: int, shutdown_timeout: float, log_level: str = "warning"):
    """A uvicorn server whose SIGTERM/SIGINT first stops admission, then lets running requests
    finish for `shutdown_timeout` seconds before the engine aborts them."""
    import uvicorn

    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.begin_shutdown(shutdown_timeout)
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                                 timeout_graceful_shutdown=shutdown_timeout + 5))


def run(args: argparse.Namespace) -> int:
    from sparsekv.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config_from_args(args), max_waiting_requests=args.max_waiting_requests)
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_request_body_bytes)
    server = make_server(app, args.host, args.port, args.shutdown_timeout, args.uvicorn_log_level)
    logger.info("serving %s on http://%s:%d (max_model_len %d)", engine.model_name, args.host, args.port,
                engine.config.max_model_len)
    server.run()
    return 0
