"""Metrics, access logging, API-key auth, body-size and concurrency limits (one ASGI middleware).

Prometheus names (a contract with dashboards and the HPA):
  llama_train_requests_total{route,status}     counter
  llama_train_request_latency_seconds{route}   histogram, request start to last byte sent
  llama_train_tokens_total{kind}               counter, kind = prompt | completion
  llama_train_inflight_requests                gauge, generation requests being served
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llama_train.serve.schemas import error_body

log = logging.getLogger("llama_train.serve")

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/ready", "/metrics")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # keep exactly the documented series
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_train_requests_total", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("llama_train_request_latency_seconds",
                                 "Request latency, first byte received to last byte sent.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("llama_train_tokens_total", "Tokens processed.", ["kind"],
                              registry=self.registry)
        self.inflight = Gauge("llama_train_inflight_requests", "Generation requests in flight.",
                              registry=self.registry)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (ELK / Loki friendly); `extra=` fields become top-level keys."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def log_config(json_logs: bool, level: str = "INFO") -> dict:
    """dictConfig for uvicorn.run(log_config=...): our logger and uvicorn's, one format."""
    fmt = {"()": JsonFormatter} if json_logs else {
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": fmt},
        "handlers": {"default": handler},
        "loggers": {
            "llama_train": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "py.warnings": {"handlers": ["default"], "level": "WARNING", "propagate": False},
        },
    }


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class GatewayMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming responses are timed to their last byte
    and the in-flight slot is held until the stream ends or the client goes away."""

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_concurrency: int,
                 max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}
        holds_slot = False

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            rejection = self._check(path, headers)
            # The whole body is read (within body_timeout_s) before a concurrency slot is taken:
            # a slow or stalled sender must not hold a slot that a complete request could use.
            if rejection is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                try:
                    receive = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
                except asyncio.TimeoutError:
                    rejection = (408, error_body(
                        f"the request body did not arrive within {self.body_timeout_s:g} s "
                        "(server --body-timeout-s)", code="request_timeout"), [(b"connection", b"close")])
                else:
                    if receive is None:
                        rejection = (413, self._too_large(), [])
            if rejection is None and route in GENERATION_ROUTES:
                if self.inflight >= self.max_concurrency:
                    rejection = (429, error_body(
                        f"server is at its concurrency limit ({self.max_concurrency} requests in "
                        "flight); retry after a short backoff", type="rate_limit_error",
                        code="rate_limit_exceeded"), [(b"retry-after", b"1")])
                else:
                    holds_slot = True
                    self.inflight += 1
                    self.metrics.inflight.set(self.inflight)
            if rejection is not None:
                code, body, extra = rejection
                await _send_json(send_wrapper, code, body, extra)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if holds_slot:
                self.inflight -= 1
                self.metrics.inflight.set(self.inflight)
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            level = logging.DEBUG if route in ("/metrics", "/health", "/ready") else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "request", extra={
                    "request_id": request_id, "method": scope.get("method"), "path": path,
                    "status": status["code"], "latency_ms": round(elapsed * 1000, 1),
                    "client": (scope.get("client") or ("", 0))[0]})

    def _too_large(self) -> dict:
        return error_body(f"request body is larger than {self.max_body_bytes} bytes",
                          code="request_too_large")

    def _check(self, path: str, headers: dict):
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large(), []
        if path.startswith("/v1/") and self.api_key:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.api_key.encode()):
                msg = ("missing API key: send `Authorization: Bearer <key>`" if not auth else
                       "incorrect API key provided")
                return 401, error_body(msg, code="invalid_api_key"), [(b"www-authenticate", b"Bearer")]
        return None

    async def _read_body(self, receive):
        """Buffer the body (bounded by max_body_bytes) so an oversized one is a clean 413;
        returns a replaying `receive`, or None when the body is too large."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body_bytes:
                return None
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect

        return replay
