"""Metrics, access logging, API-key auth, body-size and concurrency limits (one ASGI middleware).

Prometheus names (a contract with dashboards, alerts and the HPA; vLLM's `vllm:*` equivalents in
brackets). HTTP, per route (/v1/* only: /metrics, /health and /ready are not counted):
  llama_train_requests_total{route,status}            counter; every status series is created at 0
                                                      at start, so rate() sees a first burst of errors
  llama_train_request_latency_seconds{route}          histogram, first byte received to last byte sent
  llama_train_inflight_requests                       gauge, generation requests holding a slot
  llama_train_tokens_total{kind}                      counter, kind = prompt | completion, at request end
Engine, per served model (`model` = the base's name or an adapter's):
  llama_train_num_requests_running{model}             gauge, requests being decoded  [num_requests_running]
  llama_train_num_requests_waiting{model}             gauge, requests queued for the engine  [num_requests_waiting]
  llama_train_prompt_tokens_total{model}              counter, at prefill  [prompt_tokens_total]
  llama_train_generation_tokens_total{model}          counter, every decode step  [generation_tokens_total]
  llama_train_time_to_first_token_seconds{model}      histogram, queued to first token  [time_to_first_token_seconds]
  llama_train_inter_token_latency_seconds{model}      histogram, between a sequence's tokens  [inter_token_latency_seconds]
  llama_train_request_queue_time_seconds{model}       histogram, queued to prefill start  [request_queue_time_seconds]
  llama_train_e2e_request_latency_seconds{model}      histogram, accepted to answered  [e2e_request_latency_seconds]
  llama_train_requests_finished_total{model,finish_reason}  counter per choice: stop | length | abort
                                                      (client gone, deadline) | error  [request_success_total]
Adapters (registry-followed, loaded at runtime, canaries):
  llama_train_adapter_requests_total{model,version}   counter, requests routed to each version of a served
                                                      adapter (the canary split)
  llama_train_adapter_info{model,role,version,registry_name}  gauge = 1 per version served now
                                                      (role = main | canary)
  llama_train_adapter_switches_total{model,result}    counter, result = switched | failed (a version that did
                                                      not download, verify or load: the old one serves on)
  llama_train_registry_poll_errors_total              counter, registry polls that failed (unreachable)
Process: process_* (CPU, memory, open fds, start time), python_info, python_gc_*, and
  llama_train_build_info{version,python,torch,transformers} = 1.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from llama_train.serve.schemas import error_body

log = logging.getLogger("llama_train.serve")

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/ready", "/metrics")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
UNCOUNTED_ROUTES = ("/health", "/ready", "/metrics")  # probes and scrapes: not traffic
COUNTED_ROUTES = ("/v1/models", *GENERATION_ROUTES)
# Every status this server answers (499: the client went away first), created at 0 per route.
STATUSES = ("200", "400", "401", "404", "408", "413", "422", "429", "499", "500", "502", "503", "504")
FINISH_REASONS = ("stop", "length", "abort", "error")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)


class _BodyAbandoned(Exception):
    """The client disconnected before the request body was complete (nothing to answer: 499)."""


class Metrics:
    def __init__(self, models: list[str] | tuple[str, ...] = ()) -> None:
        prometheus_client.disable_created_metrics()  # keep exactly the documented series
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "llama_train_requests_total", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "llama_train_request_latency_seconds",
            "Request latency, first byte received to last byte sent.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("llama_train_tokens_total", "Tokens of finished requests.", ["kind"], registry=r)
        self.inflight = Gauge("llama_train_inflight_requests", "Generation requests in flight.", registry=r)
        self.running = Gauge("llama_train_num_requests_running", "Requests being decoded.", ["model"], registry=r)
        self.waiting = Gauge(
            "llama_train_num_requests_waiting", "Requests queued for the engine.", ["model"], registry=r
        )
        self.prompt_tokens = Counter("llama_train_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r)
        self.generation_tokens = Counter(
            "llama_train_generation_tokens", "Tokens generated, counted every decode step.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "llama_train_time_to_first_token_seconds",
            "Time from queueing to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llama_train_inter_token_latency_seconds",
            "Time between two tokens of one sequence.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "llama_train_request_queue_time_seconds",
            "Time from queueing to the start of prefill.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llama_train_e2e_request_latency_seconds",
            "Time from accepting a generation request to its last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "llama_train_requests_finished",
            "Finished choices by finish reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "llama_train_adapter_requests",
            "Requests routed to each adapter version of a served model.",
            ["model", "version"],
            registry=r,
        )
        self.adapter_info = Gauge(
            "llama_train_adapter_info",
            "Adapter versions served now (value 1).",
            ["model", "role", "version", "registry_name"],
            registry=r,
        )
        self.adapter_switches = Counter(
            "llama_train_adapter_switches", "Adapter version changes by result.", ["model", "result"], registry=r
        )
        self.registry_errors = Counter("llama_train_registry_poll_errors", "Registry polls that failed.", registry=r)
        self._adapter_series: dict[str, list[tuple]] = {}
        self.build_info = Gauge(
            "llama_train_build_info",
            "Versions of this server (value 1).",
            ["version", "python", "torch", "transformers"],
            registry=r,
        )
        self.build_info.labels(**_versions()).set(1)
        for route in COUNTED_ROUTES:
            self.latency.labels(route)
            for status in STATUSES:
                self.requests.labels(route, status)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)
        self.models: list[str] = []
        self.add_models(models)

    def set_adapter_version(self, model: str, info: dict, canary: tuple | None) -> None:
        """llama_train_adapter_info of `model`: its main version and its canary's, if any."""
        for labels in self._adapter_series.pop(model, []):
            self.adapter_info.remove(*labels)
        series = []
        if info.get("version"):
            series.append((model, "main", str(info["version"]), str(info.get("registry_name", ""))))
        c = info.get("canary") or {}
        if canary is not None and c.get("version"):
            series.append((model, "canary", str(c["version"]), str(c.get("registry_name", ""))))
        for labels in series:
            self.adapter_info.labels(*labels).set(1)
        self._adapter_series[model] = series

    def add_models(self, models) -> None:
        """Create every per-model series at 0 (gauges 0, counters 0, empty histograms)."""
        for m in models:
            if m in self.models:
                continue
            self.models.append(m)
            for metric in (
                self.running,
                self.waiting,
                self.prompt_tokens,
                self.generation_tokens,
                self.ttft,
                self.itl,
                self.queue_time,
                self.e2e,
            ):
                metric.labels(m)
            for reason in FINISH_REASONS:
                self.finished.labels(m, reason)

    def request_done(self, model: str, reasons: list[str | None], started: float) -> None:
        """One generation request answered: its choices' finish reasons (None = cut short)."""
        self.e2e.labels(model).observe(time.monotonic() - started)
        for reason in reasons:
            self.finished.labels(model, reason or "abort").inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    return {
        "version": v("llama-train"),
        "python": platform.python_version(),
        "torch": v("torch"),
        "transformers": v("transformers"),
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line (ELK / Loki friendly); `extra=` fields become top-level keys."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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
    fmt = {"()": JsonFormatter} if json_logs else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
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
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class GatewayMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming responses are timed to their last byte
    and the in-flight slot is held until the stream ends or the client goes away."""

    def __init__(
        self,
        app,
        *,
        metrics: Metrics,
        api_key: str | None,
        max_concurrency: int,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
    ):
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
                except TimeoutError:
                    rejection = (
                        408,
                        error_body(
                            f"the request body did not arrive within {self.body_timeout_s:g} s "
                            "(server --body-timeout-s)",
                            code="request_timeout",
                        ),
                        [(b"connection", b"close")],
                    )
                except _BodyAbandoned:  # the client left before its body was complete
                    status["code"] = 499
                    return
                else:
                    if receive is None:
                        rejection = (413, self._too_large(), [])
            if rejection is None and route in GENERATION_ROUTES:
                if self.inflight >= self.max_concurrency:
                    rejection = (
                        429,
                        error_body(
                            f"server is at its concurrency limit ({self.max_concurrency} requests in "
                            "flight); retry after a short backoff",
                            type="rate_limit_error",
                            code="rate_limit_exceeded",
                        ),
                        [(b"retry-after", b"1")],
                    )
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
            if route not in UNCOUNTED_ROUTES:
                self.metrics.requests.labels(route, str(status["code"])).inc()
                self.metrics.latency.labels(route).observe(elapsed)
            level = logging.DEBUG if route in UNCOUNTED_ROUTES else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope.get("method"),
                        "path": path,
                        "status": status["code"],
                        "latency_ms": round(elapsed * 1000, 1),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )

    def _too_large(self) -> dict:
        return error_body(f"request body is larger than {self.max_body_bytes} bytes", code="request_too_large")

    def _check(self, path: str, headers: dict):
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large(), []
        if path.startswith("/v1/") and self.api_key:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                msg = (
                    "missing API key: send `Authorization: Bearer <key>`" if not auth else "incorrect API key provided"
                )
                return 401, error_body(msg, code="invalid_api_key"), [(b"www-authenticate", b"Bearer")]
        return None

    async def _read_body(self, receive):
        """Buffer the body (bounded by max_body_bytes) so an oversized one is a clean 413;
        returns a replaying `receive`, or None when the body is too large."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _BodyAbandoned
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
