"""The OpenAI-compatible FastAPI app: /v1/models, /v1/chat/completions, /v1/completions,
/health (liveness), /ready (model loaded), /metrics (Prometheus).

`create_app(engine, ...)` wires the pieces: the Engine (model, adapters, batching worker), the
GatewayMiddleware (auth, limits, metrics, access log) and upstream routes (remote endpoints
served under local names). Every error is an OpenAI-shaped JSON body; none stops the server.
The handlers live beside it: `serve.completions` (chat and text completions), `serve.models`
(the model list and the adapter endpoints).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_train.serve.completions import Completions
from llama_train.serve.engine import Engine
from llama_train.serve.models import Models
from llama_train.serve.observe import GatewayMiddleware, Metrics
from llama_train.serve.schemas import APIError, error_body
from llama_train.serve.upstream import Upstream

log = logging.getLogger("llama_train.serve")
_ENV = object()


def create_app(
    engine: Engine | None,
    *,
    upstreams: dict[str, Upstream] | None = None,
    api_key: Any = _ENV,
    max_concurrency: int = 32,
    request_timeout_s: float = 120.0,
    max_body_bytes: int = 4 << 20,
    body_timeout_s: float = 30.0,
) -> FastAPI:
    """Build the app. `api_key` defaults to $LLAMA_TRAIN_API_KEY; None/empty = no auth.
    `engine` None serves upstream routes only. The engine's worker starts with the app."""
    if api_key is _ENV:
        api_key = os.environ.get("LLAMA_TRAIN_API_KEY") or None
    if not api_key:
        log.warning("LLAMA_TRAIN_API_KEY is not set: /v1 routes accept requests without an API key")
    upstreams = dict(upstreams or {})
    if engine is not None:
        clash = set(upstreams) & ({engine.base_id} | set(engine.adapters))
        if clash:
            raise ValueError(f"--upstream name(s) {sorted(clash)} collide with local model names")
    metrics = Metrics([engine.base_id, *engine.adapters] if engine is not None else [])
    if engine is not None:
        engine.metrics = metrics
        for name, info in engine.adapter_info.items():
            metrics.set_adapter_version(name, info, None)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            engine.start()
        app.state.http = httpx.AsyncClient()
        try:
            yield
        finally:
            if engine is not None:  # uvicorn has drained the requests by now
                await asyncio.to_thread(engine.stop)
            await app.state.http.aclose()

    app = FastAPI(title="llama_train server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
    )
    models = Models(engine, upstreams, metrics, created)
    completion_api = Completions(engine, upstreams, metrics, request_timeout_s, models)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(msg, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if engine is not None and engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": repr(engine.load_error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine is None or (engine.ready.is_set() and engine.running):
            return {"status": "ready"}
        status = "failed" if engine.load_error is not None or engine.ready.is_set() else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": models.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in models.model_cards():
            if card["id"] == model_id:
                return card
        raise models.unknown_model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion_api.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion_api.handle(request, "text")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await models.load_adapter(request)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await models.unload_adapter(request)

    return app
