"""A generation request and what comes back for it: the app builds a `GenRequest` and submits
it to the engine; the engine's worker thread posts `Event`s (text deltas, finish reasons, or an
error) to the request's asyncio queue as tokens are produced, so streaming and non-streaming
share one path.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from llama_train.serve.sampling import SamplingParams


class AdapterGone(KeyError):
    """The request's adapter was unloaded between the request's checks and its submission."""


class ShuttingDown(RuntimeError):
    """Posted to requests still queued or running when the engine stops."""


@dataclass
class Event:
    """What the worker reports: text deltas per choice, a finish reason, or an error."""

    # (choice index, new text, finish_reason or None, logprob entries of the tokens behind the
    # new text: [] unless the request asked for logprobs)
    deltas: list[tuple[int, str, str | None, list[dict]]]
    error: BaseException | None = None


class GenRequest:
    """One HTTP request: n sequences of the same prompt, for one model (base or adapter)."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        model: str,
        adapter: str | None,
        loop: asyncio.AbstractEventLoop,
        *,
        deadline: float | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.deadline = deadline  # time.monotonic() by which the client gets its 504
        self.params = params
        self.model = model
        self.adapter = adapter
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.completion_tokens = 0
        self.enqueued_at = time.monotonic()
        self.first_token_at: float | None = None
        # params.prompt_logprobs: one entry per prompt token (the first has logprob None), set by
        # the worker at prefill, before the request's first event
        self.prompt_logprobs: list[dict] | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def post(self, event: Event) -> None:
        if not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # its event loop is closed: nobody is waiting any more
                self.cancelled = True
