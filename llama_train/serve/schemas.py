"""OpenAI request bodies (pydantic) and OpenAI-shaped errors.

Error bodies follow the OpenAI API: `{"error": {"message", "type", "param", "code"}}`, so the
official clients raise the matching exception (401 AuthenticationError, 404 NotFoundError, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation_error(exc: ValidationError) -> APIError:
    """First pydantic error -> 400 naming the parameter, the rule and the value sent."""
    e = exc.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    got = e.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) and e["type"] != "missing" else ""
    more = f" (and {len(exc.errors()) - 1} more errors)" if len(exc.errors()) > 1 else ""
    return APIError(
        400,
        f"{param}: {e['msg']}{got_s}{more}",
        param=param,
        code="invalid_value" if e["type"] != "missing" else "missing_required_parameter",
    )


class _Body(BaseModel):
    # Clients send fields this server ignores (user, metadata, ...); unknown keys are allowed,
    # the few that would change results silently are rejected in `reject_unsupported`.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    ignore_eos: bool = False
    top_k: int = Field(-1, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be between -100 and 100 (got {bias} for token {key})")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def reject_unsupported(self, names: tuple[str, ...]) -> None:
        """400 for parameters this server would otherwise ignore while they change the result."""
        extra = self.model_extra or {}
        for name in names + UNSUPPORTED:
            value = extra.get(name)
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "best_of" and value in (1, self.n):
                continue
            if value not in (None, False, [], 0, {}):
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
            )
        most = self.effective_max_tokens()
        if self.min_tokens and most is not None and self.min_tokens > most:
            raise APIError(
                400,
                f"min_tokens ({self.min_tokens}) is larger than max_tokens ({most})",
                param="min_tokens",
                code="invalid_value",
            )
        if most == 0 and not getattr(self, "echo", False):
            raise APIError(
                400,
                "max_tokens 0 only scores the prompt: it needs echo: true (and logprobs)",
                param="max_tokens",
                code="invalid_value",
            )

    def token_biases(self, vocab: int) -> dict[int, float]:
        biases = {int(k): v for k, v in (self.logit_bias or {}).items()}
        check_token_ids(biases, vocab, "logit_bias")
        return biases

    def token_ids(self, name: str, vocab: int) -> list[int] | None:
        """stop_token_ids / allowed_token_ids, checked against the vocabulary."""
        ids = getattr(self, name)
        if ids is not None:
            check_token_ids(ids, vocab, name)
        return ids

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def find_unencodable(doc) -> str | None:
    """Path ("messages.0.content") of the first string (or key) holding a lone UTF-16 surrogate
    (JSON allows "\\ud800"; UTF-8 and the tokenizer do not). Iterative: bodies may nest deeply."""
    stack: list[tuple[str, object]] = [("", doc)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path or None
        for key, value in reversed(list(items)):
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _encodable(key):
                return sub
            stack.append((sub, value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_token_ids(ids, vocab: int, param: str) -> None:
    bad = sorted({t for t in ids if not 0 <= t < vocab})
    if bad:
        raise APIError(
            400,
            f"{param} token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
            param=param,
            code="invalid_value",
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"message content part of type {part.get('type')!r} is not supported (text only)",
                    param="messages",
                    code="invalid_value",
                )
            parts.append(part["text"])
        return "".join(parts)


MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (and vLLM's default --max-logprobs)


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def reject_unsupported(self, names: tuple[str, ...]) -> None:
        extra = self.model_extra or {}
        # "none" asks for no tool call, which is what happens without tools (vLLM accepts it too)
        if extra.get("tool_choice") not in (None, "none") and not extra.get("tools"):
            raise APIError(
                400, "tool_choice is only allowed when tools are specified", param="tool_choice", code="invalid_value"
            )
        super().reject_unsupported(names)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_params(self) -> tuple[int | None, bool]:
        """(how many alternatives per token, None = no logprobs; prompt logprobs)."""
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None, False


class CompletionRequest(_Body):
    # a string, strings, token ids, or lists of token ids (lm-evaluation-harness sends these)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=0)  # the OpenAI default; 0 with echo: score the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_params(self) -> tuple[int | None, bool]:
        return self.logprobs, bool(self.echo and self.logprobs is not None)


# Parameters that would change the result: rejected (400) rather than silently ignored.
UNSUPPORTED = (
    "best_of",
    "use_beam_search",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "prompt_logprobs",
    "bad_words",
    "logits_processors",
)
CHAT_UNSUPPORTED = ("functions", "audio", "echo", "continue_final_message", "chat_template")
COMPLETION_UNSUPPORTED = ("suffix", "response_format")  # chat has it (structured.py)
