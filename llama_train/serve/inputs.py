"""From a validated OpenAI request to what the engine takes: each prompt's token ids (chat
messages through the model's chat template, texts, or token ids), the `SamplingParams` (after
the context-length checks), the plan for tools and structured output, and under `echo` the
prompt texts. What the model cannot do is refused with a 4xx `APIError`.
"""

from __future__ import annotations

from llama_train.serve.engine import Engine
from llama_train.serve.sampling import SamplingParams
from llama_train.serve.schemas import APIError, CompletionRequest, check_token_ids
from llama_train.serve.structured import ToolPlan, history_message, plan


def tool_plan(engine: Engine, req) -> ToolPlan:
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
    out = plan(extra, engine.tokenizer.chat_template)
    if out.grammar is not None:
        forced = extra.get("tool_choice") not in (None, "none", "auto")
        engine.grammars.check(out.grammar, "tools" if forced else "response_format")
    return out


def prompt_ids(engine: Engine, req, kind: str, tools: ToolPlan | None = None) -> list[list[int]]:
    """The token ids of each prompt: chat messages through the chat template, texts, or token ids."""
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


def echo_texts(engine: Engine, req, prompts: list[list[int]]) -> list[str]:
    """The prompt text each choice starts with under `echo` (token prompts are decoded)."""
    if isinstance(req.prompt, str):
        return [req.prompt]
    if all(isinstance(p, str) for p in req.prompt):
        return list(req.prompt)
    return [engine.tokenizer.decode(ids) for ids in prompts]


def sampling_params(
    engine: Engine, req, prompt_len: int, top_logprobs: int | None, prompt_logprobs: bool, grammar: str | None = None
) -> SamplingParams:
    """The request's SamplingParams; a 400 when prompt and max_tokens do not fit the context or the
    token constraints leave nothing to generate."""
    ctx = engine.context_length
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
    allowed = req.token_ids("allowed_token_ids", engine.vocab_size)
    stop_ids = req.token_ids("stop_token_ids", engine.vocab_size) or []
    if allowed is not None and req.min_tokens > 0:
        stops = set(stop_ids) | (set() if req.ignore_eos else engine.eos_ids)
        if set(allowed) <= stops:
            raise APIError(
                400,
                f"allowed_token_ids {sorted(set(allowed))[:5]} are all stop tokens, so "
                f"min_tokens {req.min_tokens} leaves no token to generate",
                param="allowed_token_ids",
                code="invalid_value",
            )
    return SamplingParams(
        max_tokens=asked if asked is not None else min(engine.default_max_tokens, room),
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
        logit_bias=req.token_biases(engine.vocab_size),
        min_tokens=req.min_tokens,
        stop_token_ids=stop_ids,
        allowed_token_ids=allowed,
        include_stop_str_in_output=req.include_stop_str_in_output,
        report_stop_token=isinstance(req, CompletionRequest),
        tokens_as_ids=req.return_tokens_as_token_ids,
        grammar=grammar,
    )
