"""The OpenAI-compatible FastAPI app: /v1/models, /v1/chat/completions, /v1/completions,
/health (liveness), /ready (model loaded), /metrics (Prometheus).

`create_app(engine, ...)` wires the pieces: the Engine (model, adapters, batching worker), the
GatewayMiddleware (auth, limits, metrics, access log) and upstream routes (remote endpoints
served under local names). Every error is an OpenAI-shaped JSON body; none stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_train.errors import LlamaTrainError
from llama_train.serve.engine import (
    AdapterGone,
    Engine,
    GenRequest,
    SamplingFailed,
    SamplingParams,
    ShuttingDown,
    check_adapter_dirs,
)
from llama_train.serve.observe import GatewayMiddleware, Metrics
from llama_train.serve.schemas import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_token_ids,
    error_body,
    find_unencodable,
    from_validation_error,
)
from llama_train.serve.structured import CallStream, ToolPlan, history_message, new_call_id, parse_calls, plan
from llama_train.serve.upstream import Upstream, proxy

ADAPTER_OP_TIMEOUT_S = 600  # a load or unload waits this long for the worker thread
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
    state = _Handlers(engine, upstreams, metrics, request_timeout_s, created)

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
        return {"object": "list", "data": state.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for card in state.model_cards():
            if card["id"] == model_id:
                return card
        raise state.unknown_model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await state.handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await state.handle(request, "text")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await state.load_adapter(request)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await state.unload_adapter(request)

    return app


def _registry_card(info: dict | None) -> dict:
    """/v1/models fields of an adapter from the registry: its model name, version and alias."""
    if not info or not info.get("registry_name"):
        return {}
    card = {
        "root": info["source"],
        "registry": {k: info.get(k) for k in ("registry_name", "version", "alias", "verified")},
    }
    if info.get("canary"):
        c = info["canary"]
        card["canary"] = {k: c.get(k) for k in ("registry_name", "version", "alias", "verified", "fraction")}
    return card


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _sampling_summary(p: SamplingParams) -> str:
    """The sampling parameters a request set away from their defaults, for error messages."""
    defaults = SamplingParams(max_tokens=p.max_tokens)
    names = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "min_tokens",
        "allowed_token_ids",
    )
    return ", ".join(f"{n}={getattr(p, n)!r}" for n in names if getattr(p, n) != getattr(defaults, n))


def _cut_reason(exc: BaseException) -> str:
    """finish_reason of choices a failure cut short: abort (client gone, deadline, shutdown) or error."""
    if isinstance(exc, APIError) and exc.status in (499, 503, 504):
        return "abort"
    return "abort" if isinstance(exc, asyncio.CancelledError) else "error"


async def _disconnected(receive) -> None:
    """Returns when the client has gone. The body was read (and replayed) by the middleware, so
    the next ASGI message is http.disconnect: on the client closing, or when the response is done."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(doc: dict | str) -> bytes:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n".encode()


class _Handlers:
    def __init__(
        self, engine: Engine | None, upstreams: dict[str, Upstream], metrics: Metrics, timeout_s: float, created: int
    ):
        self.engine, self.upstreams, self.metrics = engine, upstreams, metrics
        self.timeout_s, self.created = timeout_s, created

    # ------------------------------------------------------------------ models
    def model_cards(self) -> list[dict]:
        cards = []
        if self.engine is not None:
            e = self.engine
            cards.append(
                {
                    "id": e.base_id,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama_train",
                    "root": e.base,
                    "parent": None,
                }
            )
            cards += [
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama_train",
                    "root": path,
                    "parent": e.base_id,
                    **_registry_card(e.adapter_info.get(name)),
                }
                for name, path in list(e.adapters.items())
            ]
        cards += [u.model_card(self.created) for u in self.upstreams.values()]
        return cards

    def unknown_model(self, name: str) -> APIError:
        known = ", ".join(c["id"] for c in self.model_cards())
        return APIError(
            404, f"The model `{name}` does not exist; served models: {known}", param="model", code="model_not_found"
        )

    # ------------------------------------------------------------------ adapters at runtime (vLLM's API)
    async def load_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/load_lora_adapter {lora_name, lora_path}; lora_path may be a models:/
        reference (an alias is then followed). Extensions: load_inplace (replace a served adapter,
        vLLM >= 0.10), canary_fraction (serve it to that fraction of lora_name's requests)."""
        body = await _json_object(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        for key, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value.strip():
                raise APIError(
                    400,
                    f"{key} is required: a non-empty string (lora_path: an adapter directory or models:/NAME@ALIAS)",
                    param=key,
                    code="invalid_value",
                )
        fraction = body.get("canary_fraction")
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
        ):
            raise APIError(
                400,
                f"canary_fraction {fraction!r}: give a number between 0 and 1 (0.1 = 10% of the requests)",
                param="canary_fraction",
                code="invalid_value",
            )
        engine = self._adapter_engine()
        if name == engine.base_id or name in self.upstreams:
            raise APIError(
                400,
                f"lora_name {name!r} is the base model's or an upstream's name; choose another",
                param="lora_name",
                code="invalid_value",
            )
        if fraction is not None and name not in engine.adapters:
            raise APIError(
                404,
                f"The lora adapter '{name}' cannot be found: load it before its canary",
                param="lora_name",
                code="model_not_found",
            )
        if fraction is None and name in engine.adapters and not body.get("load_inplace"):
            raise APIError(
                400,
                f"The lora adapter '{name}' has already been loaded. Unload it first, "
                "or send load_inplace: true to replace it",
                param="lora_name",
                code="invalid_value",
            )
        follower = engine.follower
        if path.startswith("models:/"):
            if follower is None:
                raise APIError(
                    400,
                    "this server has no registry (start it with --registry-uri or $MLFLOW_TRACKING_URI)",
                    param="lora_path",
                    code="invalid_value",
                )
            try:
                local, info = await asyncio.to_thread(follower.fetch, path)
            except LlamaTrainError as exc:
                raise APIError(400, str(exc), param="lora_path", code="invalid_value") from None
            except Exception as exc:  # noqa: BLE001  (registry unreachable)
                raise APIError(
                    503,
                    f"the registry did not answer ({type(exc).__name__}); retry",
                    type="server_error",
                    code="registry_unavailable",
                ) from None
        else:
            try:
                check_adapter_dirs({name: path})
            except ValueError as exc:
                raise APIError(
                    400, str(exc).replace(f"--adapter {name}=", "lora_path "), param="lora_path", code="invalid_value"
                ) from None
            local, info = path, {}
        # Stop following what this replaces before switching, so a poll that is downloading a
        # version of it cannot switch back over this load (from review).
        detached = [] if follower is None else follower.detach(name, canary=fraction is not None, main=fraction is None)
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(
                    engine.install_adapter(name, local, source=path, info=info, canary_fraction=fraction)
                ),
                timeout=ADAPTER_OP_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001  (does not load on this base)
            if follower is not None:
                follower.reattach(detached)  # the old one serves on, and is followed again
                if path.startswith("models:/"):
                    follower.release_path(local)  # the download that did not load
            raise APIError(
                400,
                f"lora_path {path}: the adapter did not load ({type(exc).__name__}: {str(exc)[:300]})",
                param="lora_path",
                code="invalid_value",
            ) from None
        if follower is not None:
            follower.release(detached)
            if path.startswith("models:/"):
                follower.follow(name, path, info["version"], local, canary_fraction=fraction)
        self.metrics.add_models([name])
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/unload_lora_adapter {lora_name}; extension: canary_only."""
        body = await _json_object(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(
                400, "lora_name is required: the served adapter's name", param="lora_name", code="invalid_value"
            )
        engine = self._adapter_engine()
        follower = engine.follower
        # detached first: a poll downloading a new version of it must not bring it back
        detached = [] if follower is None else follower.detach(name, main=not body.get("canary_only"))
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(engine.remove_adapter(name, canary_only=bool(body.get("canary_only")))),
                timeout=ADAPTER_OP_TIMEOUT_S,
            )
        except KeyError:
            if follower is not None:
                follower.reattach(detached)
            raise APIError(
                404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found"
            ) from None
        if follower is not None:
            follower.release(detached)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _adapter_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(
                400, "this server only proxies upstreams: no local model to load adapters into", code="invalid_value"
            )
        if not self.engine.ready.is_set():
            raise APIError(
                503,
                "the model is still loading; retry when /ready answers 200",
                type="server_error",
                code="model_not_ready",
            )
        return self.engine

    # ------------------------------------------------------------------ requests
    async def handle(self, request: Request, kind: str) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body nests JSON arrays/objects too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        bad = find_unencodable(body)
        if bad is not None:
            raise APIError(
                400,
                f"{bad}: contains a lone UTF-16 surrogate (not valid Unicode text)",
                param=bad,
                code="invalid_value",
            )
        model = body.get("model")
        if isinstance(model, str) and model in self.upstreams:
            route = "/chat/completions" if kind == "chat" else "/completions"
            return await proxy(request.app.state.http, self.upstreams[model], route, body, self.timeout_s)
        schema, unsupported = (
            (ChatCompletionRequest, CHAT_UNSUPPORTED) if kind == "chat" else (CompletionRequest, COMPLETION_UNSUPPORTED)
        )
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        req.reject_unsupported(unsupported)
        top_logprobs, prompt_logprobs = req.logprob_params()
        engine = self.engine
        if engine is None or (req.model != engine.base_id and req.model not in engine.adapters):
            raise self.unknown_model(req.model)
        if not engine.ready.is_set():
            raise APIError(
                503,
                "the model is still loading; retry when /ready answers 200",
                type="server_error",
                code="model_not_ready",
            )
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        extra = req.model_extra or {}
        if kind != "chat":
            tools = ToolPlan()
        elif extra.get("tools") or extra.get("response_format"):  # compiles a grammar: off the event loop
            tools = await asyncio.to_thread(self._tool_plan, req)
        else:
            tools = self._tool_plan(req)
        prompts = self._prompts(req, kind, tools)
        adapter = None if req.model == engine.base_id else req.model
        loop = asyncio.get_running_loop()
        ends_at = time.monotonic() + self.timeout_s  # the same deadline, on the engine's clock
        gens = [
            GenRequest(
                ids,
                self._params(req, len(ids), top_logprobs, prompt_logprobs, tools.grammar),
                req.model,
                adapter,
                loop,
                deadline=ends_at,
            )
            for ids in prompts
        ]
        if req.stream and len(gens) > 1:
            raise APIError(
                400,
                "stream with several prompts is not supported; send one prompt",
                param="prompt",
                code="unsupported_parameter",
            )
        out = _Output(
            kind,
            req.n,
            top_logprobs is not None,
            self._echo_texts(req, prompts) if kind == "text" and req.echo else None,
            engine.special_tokens,
            tools,
        )
        for gen in gens:
            self.metrics.tokens.labels("prompt").inc(len(gen.prompt_ids))
            engine.submit(gen)
        meta = {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
        }
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            if req.stream:
                return await self._stream(gens[0], req, out, meta, deadline, gone)
            return await self._complete(gens, req, out, meta, deadline, gone)
        finally:
            gone.cancel()  # a stream's body watches for disconnects itself

    def _tool_plan(self, req) -> ToolPlan:
        """tools / tool_choice / response_format checked against the model's template; a
        grammar that does not compile (a schema llguidance cannot enforce) is a 400 too."""
        extra = req.model_extra or {}
        if extra.get("tools") or extra.get("response_format") not in (None, {"type": "text"}):
            try:
                import llguidance  # noqa: F401  (the serve extra installs it)
            except ImportError:
                raise APIError(
                    400,
                    "tools and response_format need llguidance: pip install 'llama_train[serve]'",
                    param="tools" if extra.get("tools") else "response_format",
                    code="unsupported_parameter",
                ) from None
        out = plan(extra, self.engine.tokenizer.chat_template)
        if out.grammar is not None:
            forced = extra.get("tool_choice") not in (None, "none", "auto")
            self.engine.grammars.check(out.grammar, "tools" if forced else "response_format")
        return out

    def _prompts(self, req, kind: str, tools: ToolPlan | None = None) -> list[list[int]]:
        engine = self.engine
        if kind == "chat":
            messages = []
            for m in req.messages:  # tool_calls, tool_call_id and name go to the template too
                extra = {
                    k: v
                    for k, v in (m.model_extra or {}).items()
                    if k in ("tool_calls", "tool_call_id", "name") and v is not None
                }
                messages.append(history_message({"role": m.role, "content": m.text(), **extra}))
            try:
                return [engine.chat_prompt_ids(messages, tools.tools if tools else None)]
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001  (jinja raise_exception(), role rules, ...)
                raise APIError(
                    422,
                    f"the model's chat template rejected these messages: {exc}",
                    param="messages",
                    code="invalid_messages",
                ) from None
        prompt = req.prompt
        if isinstance(prompt, str):
            return [engine.text_prompt_ids(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [engine.text_prompt_ids(p) for p in prompt]
        lists = [list(prompt)] if all(isinstance(p, int) for p in prompt) else [list(p) for p in prompt]
        for ids in lists:
            if not ids:
                raise APIError(400, "a token-id prompt is empty", param="prompt", code="invalid_value")
            check_token_ids(ids, len(engine.tokenizer), "prompt")
        return lists

    def _echo_texts(self, req, prompts: list[list[int]]) -> list[str]:
        """The prompt text each choice starts with under `echo` (token prompts are decoded)."""
        if isinstance(req.prompt, str):
            return [req.prompt]
        if all(isinstance(p, str) for p in req.prompt):
            return list(req.prompt)
        return [self.engine.tokenizer.decode(ids) for ids in prompts]

    def _params(
        self, req, prompt_len: int, top_logprobs: int | None, prompt_logprobs: bool, grammar: str | None = None
    ) -> SamplingParams:
        ctx = self.engine.context_length
        asked = req.effective_max_tokens()
        room = ctx - prompt_len
        if asked is not None and prompt_len + asked > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} "
                "for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens" if prompt_len < ctx else "messages",
                code="context_length_exceeded",
            )
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens and the prompt has {prompt_len}; shorten it.",
                param="messages",
                code="context_length_exceeded",
            )
        allowed = req.token_ids("allowed_token_ids", self.engine.vocab_size)
        stop_ids = req.token_ids("stop_token_ids", self.engine.vocab_size) or []
        if allowed is not None and req.min_tokens > 0:
            stops = set(stop_ids) | (set() if req.ignore_eos else self.engine.eos_ids)
            if set(allowed) <= stops:
                raise APIError(
                    400,
                    f"allowed_token_ids {sorted(set(allowed))[:5]} are all stop tokens, so "
                    f"min_tokens {req.min_tokens} leaves no token to generate",
                    param="allowed_token_ids",
                    code="invalid_value",
                )
        return SamplingParams(
            max_tokens=asked if asked is not None else min(self.engine.default_max_tokens, room),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop or []),
            seed=req.seed,
            n=req.n,
            ignore_eos=req.ignore_eos,
            logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            logit_bias=req.token_biases(self.engine.vocab_size),
            min_tokens=req.min_tokens,
            stop_token_ids=stop_ids,
            allowed_token_ids=allowed,
            include_stop_str_in_output=req.include_stop_str_in_output,
            report_stop_token=isinstance(req, CompletionRequest),
            tokens_as_ids=req.return_tokens_as_token_ids,
            grammar=grammar,
        )

    async def _next_event(self, gen: GenRequest, deadline: float, gone: asyncio.Future | None = None):
        """The request's next event; 504 at its deadline, 499 when the client has gone (the
        engine stops generating for it either way)."""
        left = deadline - asyncio.get_running_loop().time()
        get = asyncio.ensure_future(gen.events.get())
        waiting = {get} if gone is None else {get, gone}
        done, _ = await asyncio.wait(waiting, timeout=max(left, 0.001), return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            event = get.result()
        else:
            get.cancel()
            gen.cancel()
            if gone is not None and gone in done:
                raise APIError(499, "the client closed the connection", code="client_closed_request")
            raise APIError(
                504,
                f"request timed out after {self.timeout_s:g} s (server --request-timeout-s)",
                type="server_error",
                code="timeout",
            ) from None
        if isinstance(event.error, ShuttingDown):
            raise APIError(
                503, "the server is shutting down; retry on another replica", type="server_error", code="shutting_down"
            )
        if isinstance(event.error, AdapterGone):  # unloaded in between: as if it never existed
            raise self.unknown_model(gen.model)
        if isinstance(event.error, SamplingFailed):
            raise APIError(
                400,
                f"sampling failed with this request's parameters ({_sampling_summary(gen.params)}): {event.error}",
                code="invalid_sampling",
            )
        if event.error is not None:
            gen.cancel()
            raise APIError(
                500,
                f"generation failed: {type(event.error).__name__}: {event.error}",
                type="server_error",
                code="generation_failed",
            )
        return event

    def _usage(self, gens: list[GenRequest]) -> dict:
        p = sum(len(g.prompt_ids) for g in gens)
        c = sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _complete(self, gens, req, out: _Output, meta, deadline, gone) -> dict:
        choices = []
        finishes = [[None] * req.n for _ in gens]
        cut = None
        try:
            for gi, gen in enumerate(gens):
                texts, finish = [""] * req.n, finishes[gi]
                entries: list[list[dict]] = [[] for _ in range(req.n)]
                while any(f is None for f in finish):
                    for idx, text, fin, lps in (await self._next_event(gen, deadline, gone)).deltas:
                        texts[idx] += text
                        entries[idx] += lps
                        finish[idx] = fin or finish[idx]
                for i in range(req.n):
                    choices.append(out.choice(gi * req.n + i, gi, gen, texts[i], entries[i], finish[i]))
        except BaseException as exc:
            cut = _cut_reason(exc)
            raise
        finally:
            for gen in gens:
                gen.cancel()
                self.metrics.tokens.labels("completion").inc(gen.completion_tokens)
            self.metrics.request_done(req.model, [f or cut for fs in finishes for f in fs], gens[0].enqueued_at)
        obj = "chat.completion" if out.kind == "chat" else "text_completion"
        return {**meta, "object": obj, "choices": choices, "usage": self._usage(gens)}

    async def _stream(self, gen, req, out: _Output, meta, deadline, gone) -> StreamingResponse:
        try:  # wait for the first tokens, so errors before them get a real status code
            first = await self._next_event(gen, deadline, gone)
        except BaseException as exc:
            self.metrics.tokens.labels("completion").inc(gen.completion_tokens)
            self.metrics.request_done(req.model, [_cut_reason(exc)] * req.n, gen.enqueued_at)
            raise
        obj = "chat.completion.chunk" if out.kind == "chat" else "text_completion"

        def chunk(
            index: int, text: str | None, finish: str | None, lps: list[dict] | None = None, role: bool = False
        ) -> bytes:
            choice = out.chunk_choice(index, text, finish, lps, role)
            return _sse({**meta, "object": obj, "choices": [choice]})

        reasons: list[str | None] = [None] * req.n  # None at the end: the client went away

        async def body():
            try:
                for i in range(req.n):
                    if out.kind == "chat":
                        yield chunk(i, None, None, role=True)
                    elif out.echo_texts is not None:  # the prompt first, as one chunk
                        yield chunk(i, out.echo_texts[0], None, gen.prompt_logprobs)
                event, done = first, 0
                # With tools, a choice's text is held until it ends: only then is it known to be
                # a tool call (sent as tool_calls deltas) or content (sent as one delta).
                held = [""] * req.n if out.tools.parse_calls else None
                held_lps: list[list[dict]] = [[] for _ in range(req.n)]
                # A forced call (grammar) has a known layout: streamed as it is generated.
                streams = [CallStream(out.tools.call_format) for _ in range(req.n)] if out.tools.forced else None
                while True:
                    for idx, text, fin, lps in event.deltas:
                        if streams is not None:
                            held[idx] += text
                            for c in out.call_deltas(idx, streams[idx], held[idx]):
                                yield _sse({**meta, "object": obj, "choices": [c]})
                            if not fin:
                                continue
                            # Cut short (length, an abort, a user stop string): no closing
                            # characters, so the held-back text is argument text after all.
                            complete = out.calls(held[idx], fin) is not None
                            if not complete and (rest := streams[idx].rest(held[idx])):
                                yield _sse(
                                    {
                                        **meta,
                                        "object": obj,
                                        "choices": [
                                            {
                                                "index": idx,
                                                "delta": {
                                                    "tool_calls": [{"index": 0, "function": {"arguments": rest}}]
                                                },
                                                "finish_reason": None,
                                                "logprobs": None,
                                            }
                                        ],
                                    }
                                )
                            if streams[idx].name is None and held[idx]:  # cut before the name: content
                                yield chunk(idx, held[idx], None, [])
                            done += 1
                            reasons[idx] = "tool_calls" if complete else fin
                            yield chunk(idx, None, reasons[idx], None)
                            continue
                        if held is not None:
                            held[idx] += text
                            held_lps[idx] += lps
                            if not fin:
                                continue
                            calls = out.calls(held[idx], fin)
                            if calls is None:
                                text, lps = held[idx], held_lps[idx]
                            else:  # content before the calls (Hermes), then the calls
                                if calls[0]:
                                    yield chunk(idx, calls[0], None, [])
                                text, fin = "", "tool_calls"
                                for c in out.call_chunks(idx, calls[1]):
                                    yield _sse({**meta, "object": obj, "choices": [c]})
                        if text:
                            yield chunk(idx, text, None, lps)
                        if fin:
                            done += 1
                            reasons[idx] = fin
                            yield chunk(idx, None, fin, None if text else lps)
                    if done >= req.n:
                        break
                    try:
                        event = await self._next_event(gen, deadline)
                    except APIError as exc:  # headers are sent: report in-band, like OpenAI
                        reasons[:] = [r or _cut_reason(exc) for r in reasons]
                        yield _sse(exc.body())
                        break
                if req.include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": self._usage([gen])})
                yield _sse("[DONE]")
            finally:  # also runs when the client disconnects: stop generating for it
                gen.cancel()
                self.metrics.tokens.labels("completion").inc(gen.completion_tokens)
                self.metrics.request_done(req.model, reasons, gen.enqueued_at)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )


ARGUMENT_PIECE_CHARS = 16  # a streamed tool call's arguments arrive in pieces of this many characters


class _Output:
    """Shapes choices and stream chunks: chat or text completion, with or without logprobs
    (chat: `{"content": [entries]}`; completions: the legacy `tokens` / `token_logprobs` /
    `top_logprobs` / `text_offset` lists) and `echo` (the prompt text and its logprobs first)."""

    def __init__(
        self,
        kind: str,
        n: int,
        logprobs: bool,
        echo_texts: list[str] | None,
        special_tokens: set[str],
        tools: ToolPlan | None = None,
    ):
        self.kind, self.logprobs, self.echo_texts = kind, logprobs, echo_texts
        self.tools = tools or ToolPlan()
        self.special = special_tokens
        self.offsets = [0] * n  # streamed text_offset so far, per choice

    def choice(
        self, index: int, prompt_index: int, gen: GenRequest, text: str, entries: list[dict], finish: str | None
    ) -> dict:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = self.calls(text, finish)
            if calls is not None:
                message = {"role": "assistant", "content": calls[0], "tool_calls": calls[1]}
                finish = "tool_calls"
            elif self.tools.forced and (partial := self.partial_call(text)) is not None:
                # a forced call cut short: the call so far, as the stream sends it; the finish
                # reason (length, stop) says that it is incomplete
                message = {"role": "assistant", "content": None, "tool_calls": [partial]}
            return {
                "index": index,
                "message": message,
                "finish_reason": finish,
                "logprobs": {"content": entries} if self.logprobs else None,
            }
        if self.echo_texts is not None:
            text = self.echo_texts[prompt_index] + text
            entries = (gen.prompt_logprobs or []) + entries
        return {
            "index": index,
            "text": text,
            "finish_reason": finish,
            "logprobs": self._legacy(entries, text, 0)[0] if self.logprobs else None,
        }

    def calls(self, text: str, finish: str | None) -> tuple[str | None, list[dict]] | None:
        """(content, tool_calls) when this output is a call of one of the request's tools."""
        t = self.tools
        if not t.parse_calls or finish not in ("stop", None):
            return None
        return parse_calls(text, t.call_format, t.tool_names)

    def partial_call(self, text: str) -> dict | None:
        """A forced call that was cut short, with the argument text it has; None before its name."""
        stream = CallStream(self.tools.call_format)
        _name, piece = stream.feed(text)
        if stream.name is None:
            return None
        return {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": stream.name, "arguments": piece + stream.rest(text)},
        }

    def call_deltas(self, index: int, stream: CallStream, text: str) -> list[dict]:
        """Stream choices for the new part of a forced call: its id and name once known, then
        each new piece of the arguments."""
        out = []
        name, piece = stream.feed(text)
        if name is not None:
            out.append(
                {
                    "index": index,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": new_call_id(),
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    },
                    "finish_reason": None,
                    "logprobs": None,
                }
            )
        if piece:
            out.append(
                {
                    "index": index,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                    "finish_reason": None,
                    "logprobs": None,
                }
            )
        return out

    def call_chunks(self, index: int, calls: list[dict]) -> list[dict]:
        """Stream choices for tool calls, as OpenAI streams them: per call, one delta with its
        index, id, type and function name (arguments ""), then the arguments in pieces."""
        out = []
        for k, call in enumerate(calls):
            fn = call["function"]
            out.append(
                {
                    "index": index,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": k,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    },
                    "finish_reason": None,
                    "logprobs": None,
                }
            )
            args = fn["arguments"]
            for start in range(0, len(args), ARGUMENT_PIECE_CHARS):
                out.append(
                    {
                        "index": index,
                        "delta": {
                            "tool_calls": [
                                {"index": k, "function": {"arguments": args[start : start + ARGUMENT_PIECE_CHARS]}}
                            ]
                        },
                        "finish_reason": None,
                        "logprobs": None,
                    }
                )
        return out

    def chunk_choice(
        self, index: int, text: str | None, finish: str | None, entries: list[dict] | None, role: bool
    ) -> dict:
        logprobs = None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            if self.logprobs and not role:
                logprobs = {"content": entries or []}
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        if self.logprobs:
            logprobs, self.offsets[index] = self._legacy(entries or [], text or "", self.offsets[index])
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

    def _legacy(self, entries: list[dict], text: str, offset: int) -> tuple[dict, int]:
        """Chat-shaped logprob entries -> the /v1/completions lists, and the offset after them.
        As OpenAI documents, each top_logprobs dict holds the chosen token as well as the k most
        likely (up to k + 1 keys). text_offset: where each token starts in the returned text
        (`offset` + position in `text`); a special token the text does not show (a BOS the
        tokenizer added, the stop token) takes no room."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        pos = 0
        for e in entries:
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            top = None
            if e["logprob"] is not None:
                top = {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                top[e["token"]] = e["logprob"]  # the chosen token wins a clash of equal strings
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset + pos)
            piece = bytes(e["bytes"]).decode("utf-8", errors="replace")
            if not (piece in self.special and not text.startswith(piece, pos)):
                pos += len(piece)
        return out, offset + pos
