"""POST /v1/chat/completions and /v1/completions: validate the request, submit one
`GenRequest` per prompt to the engine, and answer with the whole response or a stream of
server-sent events. Engine failures, the deadline and a client that went away become
OpenAI-shaped errors (in-band once a stream has started); a request for an upstream model is
proxied.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llama_train.serve.engine import Engine
from llama_train.serve.inputs import echo_texts, prompt_ids, sampling_params, tool_plan
from llama_train.serve.models import Models
from llama_train.serve.observe import Metrics
from llama_train.serve.output import Output
from llama_train.serve.request import AdapterGone, GenRequest, ShuttingDown
from llama_train.serve.sampling import SamplingFailed, SamplingParams
from llama_train.serve.schemas import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    find_unencodable,
    from_validation_error,
)
from llama_train.serve.structured import CallStream, ToolPlan
from llama_train.serve.upstream import Upstream, proxy


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


class Completions:
    """The completion endpoints; `models` answers for unknown model names."""

    def __init__(
        self,
        engine: Engine | None,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
        timeout_s: float,
        models: Models,
    ):
        self.engine, self.upstreams, self.metrics = engine, upstreams, metrics
        self.timeout_s, self.models = timeout_s, models

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
            raise self.models.unknown_model(req.model)
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
            tools = await asyncio.to_thread(tool_plan, engine, req)
        else:
            tools = tool_plan(engine, req)
        prompts = prompt_ids(engine, req, kind, tools)
        adapter = None if req.model == engine.base_id else req.model
        loop = asyncio.get_running_loop()
        ends_at = time.monotonic() + self.timeout_s  # the same deadline, on the engine's clock
        gens = [
            GenRequest(
                ids,
                sampling_params(engine, req, len(ids), top_logprobs, prompt_logprobs, tools.grammar),
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
        out = Output(
            kind,
            req.n,
            top_logprobs is not None,
            echo_texts(engine, req, prompts) if kind == "text" and req.echo else None,
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
            raise self.models.unknown_model(gen.model)
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

    async def _complete(self, gens, req, out: Output, meta, deadline, gone) -> dict:
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

    async def _stream(self, gen, req, out: Output, meta, deadline, gone) -> StreamingResponse:
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
