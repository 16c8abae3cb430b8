"""Tool calling and structured output for the chat API.

A request's `tools`, `tool_choice` and `response_format` become three things:
  - what the chat template renders (the tools, through the model's own template: Llama 3.1's
    `tools` support, Hermes-style `<tool_call>` templates);
  - a grammar (llguidance; JSON Schema or Lark with an embedded JSON Schema) that constrains the
    decoding of a row when the output must be a call (`tool_choice: required` or a named
    function) or JSON (`response_format` `json_object` / `json_schema`), so the output always
    parses and validates, even from a random model (the grammar decides which tokens are legal,
    the model only chooses among them);
  - how the output is read back: a tool call (Llama 3.1 JSON `{"name", "parameters"}`, or
    `<tool_call>{"name", "arguments"}</tool_call>`) becomes `tool_calls` with finish_reason
    `tool_calls`.

Which of the two call formats applies is read from the template: one that mentions `<tool_call>`
is Hermes-style (Qwen, Hermes, ChatML tool templates), any other is Llama 3.1's JSON.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field

from llama_train.serve.schemas import APIError

# Generated JSON in the layout templates render (`tojson`: ", " and ": "), with no free whitespace:
# a random model could otherwise fill the output with spaces and newlines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LLAMA_JSON, HERMES = "llama3_json", "hermes"


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class ToolPlan:
    """What one chat request asks for: tools to render, whether to read calls back, the grammar."""

    tools: list[dict] | None = None  # OpenAI tool definitions, for the template
    parse_calls: bool = False  # read the output back as tool calls (tools, choice != none)
    grammar: str | None = None  # llguidance grammar (JSON), None = unconstrained
    call_format: str = LLAMA_JSON
    tool_names: set[str] = field(default_factory=set)
    forced: bool = False  # the grammar makes the output one call (streamed as it comes)


def call_format(chat_template: str | None) -> str:
    return HERMES if chat_template and "<tool_call>" in chat_template else LLAMA_JSON


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads the `tools` variable (else tool definitions would vanish)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def plan(extra: dict, chat_template: str | None) -> ToolPlan:
    """Check `tools` / `tool_choice` / `response_format` (400s name the field) and build the plan."""
    tools = extra.get("tools")
    choice = extra.get("tool_choice")
    fmt = extra.get("response_format")
    out = ToolPlan()
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools", 'must be a list of {"type": "function", "function": {...}}')
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
                raise _bad(f"tools.{i}", 'must be {"type": "function", "function": {"name", "parameters"?}}')
            if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
                raise _bad(
                    f"tools.{i}.function.name", f"must be 1-64 letters, digits, _ . or - (got {fn.get('name')!r})"
                )
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise _bad(f"tools.{i}.function.parameters", "must be a JSON Schema object")
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise _bad("tools", f"function names must be unique (got {names})")
        if not template_renders_tools(chat_template):
            raise APIError(
                400,
                "tools: this model's chat template does not render tools (it never reads "
                "the `tools` variable), so the model would not see them; serve a model whose "
                "template supports tools (Llama 3.1 and later, Hermes-style `<tool_call>`)",
                param="tools",
                code="unsupported_parameter",
            )
        out.tools, out.tool_names = tools, set(names)
        out.call_format = call_format(chat_template)
    choice = "auto" if choice is None and tools else (choice or "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise _bad(
                "tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        if name not in out.tool_names:
            raise _bad("tool_choice", f"function {name!r} is not among the tools ({sorted(out.tool_names)})")
        forced = [t for t in tools if t["function"]["name"] == name]
    elif choice in ("none", "auto", "required"):
        forced = list(tools) if choice == "required" else None
    else:
        raise _bad("tool_choice", f'must be "none", "auto", "required" or a named function (got {choice!r})')
    out.parse_calls = bool(tools) and choice != "none"
    schema = _response_schema(fmt)
    if forced:
        if schema is not None:
            raise _bad(
                "response_format",
                "cannot be combined with tool_choice required or a named function (the output is then a tool call)",
            )
        out.grammar = _call_grammar(forced, out.call_format)
        out.forced = True
    elif schema is not None:
        out.grammar = _json_grammar(schema)
    return out


def _response_schema(fmt) -> dict | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise _bad("response_format.json_schema", 'must be {"name", "schema", "strict"?}')
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "must be a JSON Schema object")
        return schema
    raise _bad("response_format.type", f'must be "text", "json_object" or "json_schema" (got {kind!r})')


def _with_layout(schema: dict) -> dict:
    return {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}


def _json_grammar(schema: dict) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_with_layout(schema)))


def _call_schema(tools: list[dict], args_key: str) -> dict:
    """One call of one of `tools`: {"name": <const>, <args_key>: <its parameters schema>}."""
    options = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", args_key],
            "properties": {
                "name": {"const": t["function"]["name"]},
                args_key: t["function"].get("parameters") or {"type": "object"},
            },
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _call_grammar(tools: list[dict], fmt: str) -> str:
    import llguidance

    if fmt == LLAMA_JSON:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(_with_layout(_call_schema(tools, "parameters")))
        )
    call = json.dumps(_with_layout(_call_schema(tools, "arguments")))
    return llguidance.LLMatcher.grammar_from_lark(f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {call}')


# ---------------------------------------------------------------------- reading calls back
def parse_calls(text: str, fmt: str, names: set[str]) -> tuple[str | None, list[dict]] | None:
    """(content before the calls or None, OpenAI tool_calls) when `text` is a call of a known
    tool in the template's format; None when it is plain content."""
    if fmt == HERMES:
        found = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, flags=re.S)
        calls = [_call(body, "arguments", names) for body in found]
        if not found or any(c is None for c in calls):
            return None
        content = text[: text.index("<tool_call>")].strip()
        return content or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    call = _call(body, "parameters", names)
    return None if call is None else (None, [call])


def _call(body: str, args_key: str, names: set[str]) -> dict | None:
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("name") not in names:
        return None
    args = doc.get(args_key, doc.get("arguments" if args_key == "parameters" else "parameters", {}))
    if not isinstance(args, dict):
        return None
    # the model's own text of the arguments when the call has the grammar's layout (so a stream,
    # which sends that text as it comes, and the whole response agree), else re-serialized
    m = _CALL_LAYOUT.fullmatch(body.strip())
    raw = m.group(2) if m and m.group(1) == doc["name"] else None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": doc["name"], "arguments": raw or json.dumps(args, ensure_ascii=False)},
    }


_CALL_LAYOUT = re.compile(r'\{"name": "([A-Za-z0-9_.-]+)", "(?:parameters|arguments)": (\{.*\})\}', re.S)
# Forced calls as the grammar writes them: (the text before the arguments, what follows them)
_STREAM_LAYOUT = {
    LLAMA_JSON: (re.compile(r'\{"name": "([A-Za-z0-9_.-]+)", "parameters": '), "}"),
    HERMES: (re.compile(r'<tool_call>\n\{"name": "([A-Za-z0-9_.-]+)", "arguments": '), "}\n</tool_call>"),
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallStream:
    """A forced call streamed as it is generated (the grammar fixes its layout): `feed` the
    text so far; it returns the function name once (when complete) and the new argument text,
    holding back what may be the call's closing characters."""

    def __init__(self, fmt: str):
        self.prefix, self.tail = _STREAM_LAYOUT[fmt]
        self.name: str | None = None
        self.start = self.sent = 0

    def feed(self, text: str) -> tuple[str | None, str]:
        new_name = None
        if self.name is None:
            m = self.prefix.match(text)
            if m is None:
                return None, ""
            self.name, self.start, new_name = m.group(1), m.end(), m.group(1)
        end = len(text) - len(self.tail)
        piece = text[self.start + self.sent : max(end, self.start + self.sent)]
        self.sent += len(piece)
        return new_name, piece

    def rest(self, text: str) -> str:
        """The argument text still held back, for a call cut short (finish `length` or an abort):
        what was held as possibly the closing characters is argument text after all."""
        if self.name is None:
            return ""
        piece = text[self.start + self.sent :]
        self.sent += len(piece)
        return piece


def history_message(m: dict) -> dict:
    """An OpenAI chat message as chat templates expect it: assistant `tool_calls` with their
    `arguments` JSON string turned into the object templates render with `tojson` (as vLLM does)."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(
                "messages", f'tool_calls[{i}] must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}'
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except json.JSONDecodeError as exc:
                raise _bad("messages", f"tool_calls[{i}].function.arguments is not valid JSON: {exc}") from None
        out.append({**c, "function": {**fn, "arguments": args}})
    return {**m, "tool_calls": out}


# ---------------------------------------------------------------------- constrained decoding
class Grammars:
    """The llguidance tokenizer of the served model (built once, ~1 s for a 128k vocabulary) and
    matchers from grammars. A matcher tracks one row: `mask` fills its allowed tokens,
    `consume` advances it by the token the row chose."""

    def __init__(self, tokenizer, vocab_size: int):
        self._hf, self._vocab = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._ll = None
        self.error: BaseException | None = None  # llguidance could not read the tokenizer

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab)
            return self._ll

    def check(self, grammar: str, param: str) -> None:
        """400 naming `param` when the grammar (a schema the request sent) does not compile."""
        import llguidance

        if self.error is not None:
            raise APIError(
                400,
                f"{param}: constrained decoding is unavailable for this model (llguidance "
                f"cannot read its tokenizer: {self.error})",
                param=param,
                code="unsupported_parameter",
            )
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise _bad(param, f"not a schema this server can enforce: {'; '.join(messages)}")

    def matcher(self, grammar: str):
        import llguidance

        m = llguidance.LLMatcher(self.ll_tokenizer, grammar)
        if m.is_error():
            raise ValueError(f"grammar: {m.get_error()}")
        return m
