"""The shapes of answers: choices of a whole response and the choices of stream chunks, for chat
and text completions, with logprobs (chat entries or the legacy completions lists), echo and
tool calls (parsed from the text, or streamed as a forced call is generated).
"""

from __future__ import annotations

from typing import Any

from llama_train.serve.request import GenRequest
from llama_train.serve.structured import CallStream, ToolPlan, new_call_id, parse_calls

ARGUMENT_PIECE_CHARS = 16  # a streamed tool call's arguments arrive in pieces of this many characters


class Output:
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
