"""Read a source's rows and normalize every format to one conversation (or one text).

Formats → conversation:
  messages    {"messages": [{"role", "content"}, ...],       system/user/assistant/tool, multi-turn;
               "tools"?: [...]}                               assistant `tool_calls` (OpenAI shape)
  alpaca      {"instruction", "input"?, "output"}             → user (instruction + input), assistant
  sharegpt    {"conversations": [{"from", "value"}, ...]}     human/gpt/system
  completion  {"prompt", "completion"}                        → user, assistant
  text        {"text"}                                        → a string; every token trained

A row that cannot be normalized raises `RowError` with a category that preflight counts:
invalid_json, missing_field, wrong_type, empty_response, malformed_tool_call.

Tool use (OpenAI shape): an assistant message may carry `tool_calls` [{"id"?, "type": "function",
"function": {"name", "arguments"}}] (content may then be empty); `arguments` is a JSON object or
a string holding one, and is normalized to the object (chat templates render it with `tojson`).
A `tool` message holds the result (`content`, `tool_call_id`?). A row's `tools` (function
definitions) go to the template with the messages: the conversation is then
`{"messages": [...], "tools": [...]}` instead of the list of messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llama_train.errors import DataError

FORMATS = ("messages", "alpaca", "sharegpt", "completion", "text")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Fields of each format, in the order they are checked; `columns` in the recipe renames them.
FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


class RowError(Exception):
    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


def _field(row: dict, name: str, *, optional: bool = False):
    value = row.get(name)
    if value is None and not optional:
        raise RowError("missing_field", f"missing field `{name}`")
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RowError("wrong_type", f"`{name}` must be a string, got {type(value).__name__}")
    return value


def _turns(
    items, name: str, role_key: str, text_key: str, role_map: dict, *, optional_text: bool = False
) -> list[dict]:
    if not isinstance(items, list):
        raise RowError("wrong_type", f"`{name}` must be a list, got {type(items).__name__}")
    if not items:
        raise RowError("missing_field", f"`{name}` is empty")
    out = []
    for k, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"`{name}[{k}]` must be an object, got {type(turn).__name__}")
        if turn.get(role_key) is None or (turn.get(text_key) is None and not optional_text):
            missing = role_key if turn.get(role_key) is None else text_key
            raise RowError("missing_field", f"missing field `{name}[{k}].{missing}`")
        role = turn[role_key]
        if not isinstance(role, str) or role not in role_map:
            raise RowError("wrong_type", f"`{name}[{k}].{role_key}` is {role!r}; use one of {sorted(role_map)}")
        text = turn.get(text_key)
        out.append({"role": role_map[role], "content": "" if text is None else _text(text, f"{name}[{k}].{text_key}")})
    return out


def _check_responses(conv: list[dict]) -> list[dict]:
    for k, m in enumerate(conv):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RowError("empty_response", f"assistant turn {k} is empty")
    return conv


def _bad_call(where: str, why: str) -> RowError:
    return RowError("malformed_tool_call", f"`{where}` {why}")


def tool_call(call, where: str) -> dict:
    """One OpenAI-shaped tool call, checked, with `arguments` as a JSON object."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise _bad_call(where, 'must be {"type": "function", "function": {"name", "arguments"}}')
    if call.get("type", "function") != "function":
        raise _bad_call(f"{where}.type", f'is {call.get("type")!r}; only "function" is supported')
    fn = call["function"]
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name.strip():
        raise _bad_call(f"{where}.function.name", "must be a non-empty string")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise _bad_call(f"{where}.function.arguments", f"is not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise _bad_call(f"{where}.function.arguments", f"must be a JSON object, got {type(args).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def _messages(row: dict) -> list[dict] | dict:
    items = _field(row, "messages")
    conv = _turns(items, "messages", "role", "content", {r: r for r in ROLES}, optional_text=True)
    for k, (m, raw) in enumerate(zip(conv, items)):
        calls = raw.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                raise _bad_call(f"messages[{k}].tool_calls", f"on a {m['role']} message (only assistant calls tools)")
            if not isinstance(calls, list) or not calls:
                raise _bad_call(f"messages[{k}].tool_calls", "must be a non-empty list")
            m["tool_calls"] = [tool_call(c, f"messages[{k}].tool_calls[{j}]") for j, c in enumerate(calls)]
        if m["role"] == "tool":
            if raw.get("content") is None:
                raise RowError("missing_field", f"missing field `messages[{k}].content`")
            if raw.get("tool_call_id") is not None:
                m["tool_call_id"] = str(raw["tool_call_id"])
        elif raw.get("content") is None and not m.get("tool_calls"):
            raise RowError("missing_field", f"missing field `messages[{k}].content`")
    _check_responses(conv)
    tools = row.get("tools")
    if tools is None:
        return conv
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise RowError("wrong_type", '`tools` must be a list of {"type": "function", "function": {"name", ...}}')
    return {"messages": conv, "tools": tools}


def normalize(row, fmt: str) -> list[dict] | dict | str:
    """One raw row (already column-mapped) → conversation messages, or the text for `text`."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "messages":
        return _messages(row)
    if fmt == "sharegpt":
        return _check_responses(_turns(_field(row, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES))
    if fmt == "alpaca":
        instruction = _text(_field(row, "instruction"), "instruction")
        extra = _field(row, "input", optional=True)
        output = _text(_field(row, "output"), "output")
        prompt = instruction + ("\n\n" + _text(extra, "input") if extra else "")
        return _check_responses([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    if fmt == "completion":
        prompt = _text(_field(row, "prompt"), "prompt")
        completion = _text(_field(row, "completion"), "completion")
        return _check_responses([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    if fmt == "text":
        text = _text(_field(row, "text"), "text")
        if not text.strip():
            raise RowError("empty_response", "`text` is empty")
        return text
    raise DataError(f"unknown data format {fmt!r}; use one of {FORMATS}")


def to_messages(row: dict, fmt: str) -> list[dict] | str:
    """Compatibility wrapper: like `normalize`, raising KeyError/TypeError on a bad row."""
    try:
        return normalize(row, fmt)
    except RowError as exc:
        raise (KeyError if exc.category == "missing_field" else TypeError)(str(exc)) from None


def _rename(row, columns: dict[str, str]):
    if not columns or not isinstance(row, dict):
        return row
    inverse = {theirs: ours for ours, theirs in columns.items()}
    return {inverse.get(k, k): v for k, v in row.items()}


def iter_raw(
    path: str,
    *,
    columns: dict[str, str] | None = None,
    split: str = "train",
    revision: str | None = None,
    key: str = "data.sources",
) -> Iterator[tuple[int, object]]:
    """(row number, row) for every row of a file or hub dataset; a row that is not valid JSON is
    yielded as a RowError (jsonl only: other readers reject a malformed file as a whole).
    Row numbers are 1-based lines for jsonl, 0-based indices otherwise."""
    columns = columns or {}
    p = Path(path)
    if p.suffix in FILE_KINDS and not p.exists():
        raise DataError(
            f"{key} path {path} does not exist; fix the path (relative paths are resolved "
            f"from the working directory {Path.cwd()})"
        )
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, RowError("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                yield n, _rename(row, columns)
        return
    import datasets

    try:
        if p.exists():
            kind = FILE_KINDS.get(p.suffix)
            if kind is None:
                raise DataError(
                    f"{key} path {path}: unsupported file type {p.suffix!r}; use .jsonl, .json, .parquet or .csv"
                )
            extra = {}
            if kind == "csv":  # every cell is text: an answer "12" must not become the integer 12
                import csv

                with p.open(newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f), [])
                extra["features"] = datasets.Features({c: datasets.Value("string") for c in header})
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", **extra)
        else:
            ds = datasets.load_dataset(path, split=split, revision=revision)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  a malformed file or an unknown hub id: name the key and the file
        raise DataError(
            f"{key} path {path}: cannot be read ({type(exc).__name__}: {exc}); check the "
            "file (one JSON object per line for .jsonl) or the hub dataset id"
        ) from None
    for n, row in enumerate(ds):
        yield n, _rename(row, columns)


def read_rows(src) -> list[dict]:
    """Raw rows of a `DataSource`, columns renamed to the format's names (invalid JSON skipped)."""
    return [
        r
        for _, r in iter_raw(src.path, columns=src.columns, split=src.split, revision=getattr(src, "revision", None))
        if not isinstance(r, RowError)
    ]
