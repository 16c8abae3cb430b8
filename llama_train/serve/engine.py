"""Model, adapters and the batching worker behind the HTTP server.

One base model with N PEFT adapters loaded side by side (`load_adapter(dir, name)`). A single
worker thread owns the model and batches continuously: each iteration it admits the queued
requests (up to `max_batch_size` sequences; when idle it first waits `batch_wait_ms` to gather
a batch), prefills them, merges them into the running batch of their model, and decodes one
token for every running batch (`set_adapter(name)`, or `disable_adapter()` for the base).
Tokens go back to each request's asyncio queue as they are produced, so streaming and
non-streaming share one path and a request never waits for another to finish.

Log probabilities (when a request asks for them) are those of the model's own distribution
(log-softmax of the float32 logits, before temperature and top-p; vLLM's default "raw"
logprobs), one entry per generated token in the OpenAI chat shape
`{"token", "logprob", "bytes", "top_logprobs"}`. The stop token that ends a sequence is listed
only where the request says so (`report_stop_token`: /v1/completions, as vLLM does); otherwise
the entries' bytes join to exactly the returned text (up to a stop string's cut).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import logging
import os
import queue
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_train.serve.admission import Pending, StepTimes, admits

log = logging.getLogger("llama_train.serve")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and the k most likely
    # Logit processing, applied in this order (as vLLM): logit_bias; min_tokens (no stop token
    # before); repetition_penalty (prompt and output tokens: positive logits / p, negative x p);
    # frequency and presence penalties (output tokens: -count x f - p); then temperature, top_k,
    # min_p (drop tokens below min_p x the top probability) and top_p.
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # stop tokens are masked and stop strings ignored until then
    allowed_token_ids: list[int] | None = None  # vLLM: sample only from these
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM: stop like EOS (also with ignore_eos)
    include_stop_str_in_output: bool = False  # vLLM: keep the stop string in the text
    report_stop_token: bool = False  # list the stop token's logprob entry (/v1/completions, as vLLM)
    tokens_as_ids: bool = False  # vLLM return_tokens_as_token_ids: entries' token = "token_id:N"
    prompt_logprobs: bool = False  # also the prompt tokens' (completions with echo)
    # llguidance grammar (serve/structured.py): each step only the tokens it allows (after the
    # other logit processing, before temperature); None = unconstrained
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.logit_bias
            or self.min_tokens
            or self.allowed_token_ids is not None
            or self.grammar is not None
        )


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM): dividing by them overflows


class SamplingFailed(ValueError):
    """Sampling one request's row raised (its parameters make the distribution inf / NaN):
    that request fails, the rows of other requests in the batch go on."""


_WAKE = object()  # put on the request queue to wake an idle worker for an adapter command


class AdapterGone(KeyError):
    """The request's adapter was unloaded between the request's checks and its submission."""


class Superseded(RuntimeError):
    """An adapter switch that was overtaken (its name unloaded or replaced meanwhile)."""


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


class Engine:
    """Loads the base (+ adapters) and serves GenRequests from a background worker thread."""

    def __init__(
        self,
        base: str,
        adapters: dict[str, str] | None = None,
        *,
        served_model_name: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch_size: int = 32,
        batch_wait_ms: float = 5.0,
        default_max_tokens: int = 256,
        prefill_chunk_tokens: int = 256,
        adapter_info: dict[str, dict] | None = None,
        chat_template: str | None = None,
    ):
        self.base = base
        self.chat_template = chat_template  # replaces the tokenizer's (--chat-template)
        # Prompts longer than this are prefilled this many tokens per engine iteration, between
        # decode steps (as vLLM's chunked prefill), so a long prompt does not stall other
        # requests' tokens; 0 = whole prompts at once.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.base_id = served_model_name or base
        self.adapters = dict(adapters or {})  # served name -> where it came from (dir or models:/ URI)
        if self.base_id in self.adapters:
            raise ValueError(f"adapter name {self.base_id!r} collides with the base model's name")
        # Adapters can change while serving (a registry alias moved, /v1/load_lora_adapter): a
        # served name routes to a PEFT adapter loaded under an internal name; a request is pinned
        # to the internal name at submit, so it finishes on the weights it started with, and a
        # replaced adapter is deleted once no request holds it.
        self.routes: dict[str, str] = {n: n for n in self.adapters}
        self.canary: dict[str, tuple[str, float]] = {}  # served name -> (internal, fraction of requests)
        # served name -> {"registry_name", "version", "alias", "verified"} for registry adapters
        self.adapter_info: dict[str, dict] = {n: dict(i) for n, i in (adapter_info or {}).items()}
        self._loaded: dict[str, str] = dict(self.adapters)  # internal PEFT name -> local directory
        # internal name -> registry version (the metrics' version label)
        self._versions = {n: str(i["version"]) for n, i in self.adapter_info.items() if i.get("version")}
        self._retiring: set[str] = set()
        self._route_lock = threading.Lock()  # route lookup + enqueue vs. a switch
        self._commands: queue.Queue = queue.Queue()  # callables the worker runs between steps
        self._num_installed = 0
        self.rng = random.Random()  # canary split (seeded in tests)
        self.follower: Any = None  # serve.follow.RegistryFollower: started and stopped with the engine
        self.dtype = dtype
        self.device = device
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.default_max_tokens = default_max_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length = 0
        self.vocab_size = 0
        self.eos_ids: set[int] = set()
        self.cache_kw = "cache"
        self._byte_decoder: dict[str, int] | None = None
        self._pieces: dict[int, tuple[str, list[int]]] = {}
        self.special_tokens: set[str] = set()
        self.grammars: Any = None  # structured.Grammars, once the tokenizer is loaded
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._pending: queue.Queue[GenRequest | None] = queue.Queue()
        self._overflow: list[GenRequest] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.metrics: Any = None  # observe.Metrics, set by the app: updated from the worker thread
        self.step_times = StepTimes()  # what admission predicts iterations from (serve.admission)
        self._chunk_s = 0.0  # this iteration's chunked prefill seconds (not decode time)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load in the worker thread (so /health answers at once and /ready flips when done)."""
        self._thread = threading.Thread(target=self._run, name="llama-train-engine", daemon=True)
        self._thread.start()
        if self.follower is not None:
            self.follower.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop the worker and join it. Requests still queued or running get a ShuttingDown
        error (the HTTP server drains its requests before it calls this). Joining matters: a
        thread still inside torch when the interpreter exits aborts the process
        (`terminate called without an active exception`, exit -6). The worker checks for stop
        between steps, so the wait is one forward pass (or a model load in progress)."""
        if self.follower is not None:
            self.follower.stop()
        self._stopping.set()
        self._pending.put(None)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("the engine worker did not stop", extra={"timeout_s": timeout_s})

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        t0 = time.monotonic()
        hf_logging.disable_progress_bar()  # progress bars on stderr would break JSON log lines
        torch.set_grad_enabled(False)
        tok = AutoTokenizer.from_pretrained(self.base)
        tok.padding_side = "left"
        if self.chat_template is not None:
            tok.chat_template = self.chat_template
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=self.dtype).to(self.device)
        if self._loaded:
            from peft import PeftModel

            names = list(self._loaded)
            model = PeftModel.from_pretrained(model, self._loaded[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(self._loaded[name], adapter_name=name)
        model.eval()
        forward = model.get_base_model().forward if self._loaded else model.forward
        self.cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or tok.model_max_length)
        self.vocab_size = max(len(tok), int(getattr(cfg, "vocab_size", 0) or 0))  # logits' width
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)
        self._byte_decoder = _BYTE_DECODER if _is_byte_level(tok) else None
        self.special_tokens = set(tok.all_special_tokens) | {
            t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special
        }
        self.model, self.tokenizer = model, tok
        from llama_train.serve.structured import Grammars

        self.grammars = Grammars(tok, self.vocab_size)
        if importlib.util.find_spec("llguidance") is not None:
            try:  # built now (~1 s for a large vocabulary), not in a request
                self.grammars.ll_tokenizer  # noqa: B018  (a cached property: built here, not in a request)
            except Exception as exc:  # noqa: BLE001  (serve without constrained decoding, say why)
                self.grammars.error = exc
                log.warning(
                    "constrained decoding unavailable: llguidance cannot read this tokenizer",
                    extra={"error": repr(exc)},
                )
        log.info(
            "model loaded",
            extra={"base": self.base, "adapters": list(self.adapters), "load_s": round(time.monotonic() - t0, 2)},
        )

    def _run(self) -> None:
        try:
            self.load()
        except BaseException as exc:  # reported by /ready, /health and every request
            self.load_error = exc
            log.exception("model load failed")
            return
        self.ready.set()
        groups: dict[str | None, _Group] = {}
        try:
            self._loop(groups)
        finally:
            self._fail_all(groups, ShuttingDown("the server is shutting down"))

    def _fail_all(self, groups: dict, exc: BaseException) -> None:
        """Post `exc` to every request still running or queued (at stop)."""
        reqs = {id(r.req): r.req for g in groups.values() for r in g.rows}
        reqs.update({id(c.req): c.req for g in groups.values() for c in g.prefilling})
        reqs.update({id(q): q for q in self._overflow})
        self._overflow.clear()
        while True:
            try:
                q = self._pending.get_nowait()
            except queue.Empty:
                break
            if isinstance(q, GenRequest):
                reqs[id(q)] = q
        for req in reqs.values():
            req.post(Event([], error=exc))
        groups.clear()
        while True:  # adapter changes that will not happen now
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            future.set_exception(exc)

    def _loop(self, groups: dict) -> None:
        while not self._stopping.is_set():
            self._run_commands(groups)
            self._update_gauges(groups)
            new = self._admit(groups, block=not groups)
            if new is None:
                return
            by_adapter: dict[str | None, list[GenRequest]] = {}
            for req in new:
                by_adapter.setdefault(req.adapter, []).append(req)
            for adapter, reqs in by_adapter.items():
                group = groups.setdefault(adapter, _Group(self, adapter))
                self._guarded(group, group.admit, reqs)
            t1 = time.monotonic()
            rows = sum(len(g.rows) for g in groups.values())
            self._chunk_s = 0.0  # seconds of chunked prefill inside this iteration's steps
            for adapter, group in list(groups.items()):
                if group.rows or group.prefilling:
                    self._guarded(group, group.step)
                if not group.rows and not group.prefilling:
                    del groups[adapter]
            self.step_times.add_step(rows, time.monotonic() - t1 - self._chunk_s)

    def _update_gauges(self, groups: dict) -> None:
        """Running and waiting requests per model, once per engine iteration."""
        m = self.metrics
        if m is None:
            return
        running = {id(r.req): r.req.model for g in groups.values() for r in g.rows if not r.done}
        running.update({id(c.req): c.req.model for g in groups.values() for c in g.prefilling})
        with self._pending.mutex:
            queued = [q for q in self._pending.queue if isinstance(q, GenRequest)]
        waiting = {id(q): q.model for q in queued + self._overflow if not q.cancelled}
        for model in m.models:
            m.running.labels(model).set(sum(1 for v in running.values() if v == model))
            m.waiting.labels(model).set(sum(1 for v in waiting.values() if v == model))

    def _guarded(self, group: _Group, fn, *args) -> None:
        """Run one prefill or decode step; an exception fails that group's requests only."""
        try:
            with self._adapter_context(group.adapter):
                fn(*args)
        except BaseException as exc:
            log.exception("generation failed")
            failed = {id(r.req): r.req for r in group.rows}
            failed.update({id(c.req): c.req for c in group.prefilling})
            failed.update({id(r): r for r in (args[0] if args else [])})
            for req in failed.values():
                req.post(Event([], error=exc))
            group.reset()

    def _admit(self, groups: dict, *, block: bool) -> list[GenRequest] | None:
        """New requests that fit in the batch. When idle, block for one and then gather more
        for batch_wait_s; while decoding, take only what is already queued (no waiting). A
        request joins only if the running rows on track keep their deadlines (serve.admission);
        otherwise it stays first in the queue."""
        batch: list[GenRequest] = []
        rows = sum(g.num_rows for g in groups.values())
        running = [
            Pending(r.req.params.max_tokens - len(r.ids), r.req.deadline)
            for g in groups.values()
            for r in g.rows
            if not r.done
        ]
        running += [
            Pending(c.req.params.max_tokens, c.req.deadline)
            for g in groups.values()
            for c in g.prefilling
            for _ in range(c.req.params.n)
        ]
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            if self._overflow:
                req = self._overflow.pop(0)
            else:
                try:
                    if block and not batch:
                        req = self._pending.get()
                    elif block:
                        left = deadline - time.monotonic()
                        req = self._pending.get(timeout=left) if left > 0 else self._pending.get_nowait()
                    else:
                        req = self._pending.get_nowait()
                except queue.Empty:
                    break
            if req is None:  # stop: what this call gathered is told it is shutting down, like the queue
                self._overflow[:0] = batch
                return None
            if req is _WAKE:  # an adapter command is waiting: run it before blocking again
                break
            if req.cancelled:
                continue
            if rows > 0 and (
                rows + req.params.n > self.max_batch_size
                or not admits(
                    self.step_times,
                    running,
                    new_rows=req.params.n,
                    new_prompt_tokens=len(req.prompt_ids),
                    now=time.monotonic(),
                    admitted_prompt_tokens=sum(len(q.prompt_ids) * q.params.n for q in batch),
                )
            ):
                self._overflow.insert(0, req)  # next iteration, when rows have finished
                break
            batch.append(req)
            rows += req.params.n
            running += [Pending(req.params.max_tokens, req.deadline)] * req.params.n
        return batch

    def _adapter_context(self, adapter: str | None):
        import contextlib

        if adapter is not None:
            self.model.set_adapter(adapter)
            return contextlib.nullcontext()
        if self._loaded:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def submit(self, req: GenRequest) -> None:
        with self._route_lock:  # a switch cannot retire the adapter between lookup and enqueue
            if req.adapter is not None:
                if req.adapter not in self.routes:
                    req.post(Event([], error=AdapterGone(f"adapter {req.adapter!r} was unloaded")))
                    return
                req.adapter = self._route(req.adapter)
            if self.metrics is not None:
                self.metrics.waiting.labels(req.model).inc()  # until the next iteration recounts
            self._pending.put(req)

    # ------------------------------------------------------------------ adapters at runtime
    def _route(self, name: str) -> str:
        """The internal adapter for one request to served adapter `name` (canary: a fraction
        goes to the canary adapter), counted per version in the metrics."""
        internal = self.routes[name]
        if name in self.canary:
            canary, fraction = self.canary[name]
            if self.rng.random() < fraction:
                internal = canary
        if self.metrics is not None:
            self.metrics.adapter_requests.labels(name, self._versions.get(internal, "local")).inc()
        return internal

    def in_worker(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread between two steps (it owns the model); its result or
        exception comes back through the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        self._pending.put(_WAKE)  # an idle worker blocks on the request queue
        return future

    def _run_commands(self, groups: dict) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                future.set_result(fn())
            except BaseException as exc:  # reported to the caller; serving goes on
                future.set_exception(exc)
        if self._retiring:
            self._drop_retired(groups)

    def install_adapter(
        self,
        name: str,
        path: str | Path,
        *,
        source: str | None = None,
        info: dict | None = None,
        canary_fraction: float | None = None,
        still_wanted=None,
    ) -> concurrent.futures.Future:
        """Load `path` beside the served adapters, then route served name `name` to it (or, with
        `canary_fraction`, that fraction of `name`'s requests). Whatever `name` used before is
        deleted when its requests have finished. The future fails (nothing is switched) when
        the adapter does not load, when a canary's main adapter is not served, or with
        `Superseded` when `still_wanted()` (asked in the worker, after loading, right before
        the switch) says the switch is no longer wanted: the name was unloaded or replaced
        while the new version downloaded."""
        if name == self.base_id:
            raise ValueError(f"adapter name {name!r} collides with the base model's name")

        def install() -> str:
            if canary_fraction is not None and name not in self.routes:
                raise ValueError(f"a canary needs {name!r} itself to be served; it is not")
            internal = ""
            while not internal or internal in self._loaded:  # never an adapter loaded at start
                self._num_installed += 1
                internal = f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)}__{self._num_installed}"
            try:
                self._load_peft(internal, str(path))
                if still_wanted is not None and not still_wanted():
                    raise Superseded(f"{name}: unloaded or replaced while this version was loading")
            except BaseException:
                others = set(self._loaded) - {internal}
                if internal in (getattr(self.model, "peft_config", None) or {}) and others:
                    self.model.delete_adapter(internal)  # a half-loaded or unwanted adapter must not linger
                    self._loaded.pop(internal, None)
                elif internal in self._loaded:  # PEFT cannot drop its only adapter: unrouted, it
                    self._retiring.add(internal)  # goes once another one is loaded
                raise
            version = str((info or {}).get("version") or "local")
            self._versions[internal] = version
            with self._route_lock:
                if canary_fraction is None:
                    old = self.routes.get(name)
                    self.routes[name] = internal
                    self.adapters[name] = source or str(path)
                    canary = self.adapter_info.get(name, {}).get("canary")
                    self.adapter_info[name] = {**(info or {}), **({"canary": canary} if canary else {})}
                else:
                    old = self.canary.get(name, (None, 0))[0]
                    self.canary[name] = (internal, canary_fraction)
                    self.adapter_info.setdefault(name, {})["canary"] = {**(info or {}), "fraction": canary_fraction}
                if old is not None:
                    self._retiring.add(old)
            if self.metrics is not None:
                self.metrics.add_models([name])
                self.metrics.set_adapter_version(name, self.adapter_info.get(name, {}), self.canary.get(name))
            log.info(
                "adapter switched",
                extra={"model": name, "version": version, "internal": internal, "canary_fraction": canary_fraction},
            )
            return internal

        return self.in_worker(install)

    def remove_adapter(self, name: str, *, canary_only: bool = False) -> concurrent.futures.Future:
        """Stop serving `name` (or only its canary); its adapters are deleted when idle."""

        def remove() -> None:
            with self._route_lock:
                if name not in self.routes:
                    raise KeyError(name)
                old = [self.canary.pop(name, (None, 0))[0]]
                self.adapter_info.get(name, {}).pop("canary", None)
                if not canary_only:
                    old.append(self.routes.pop(name))
                    self.adapters.pop(name, None)
                    self.adapter_info.pop(name, None)
                self._retiring.update(o for o in old if o is not None)
            if self.metrics is not None:
                self.metrics.set_adapter_version(name, self.adapter_info.get(name, {}), self.canary.get(name))

        return self.in_worker(remove)

    def _load_peft(self, internal: str, path: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=internal)
        else:  # the first adapter of a server started without any
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=internal)
            self.model.eval()
        self._loaded[internal] = path

    def _drop_retired(self, groups: dict) -> None:
        """Delete replaced adapters that no running, prefilling or queued request holds."""
        busy = {a for a, g in groups.items() if g.rows or g.prefilling}
        with self._pending.mutex:
            busy |= {q.adapter for q in self._pending.queue if isinstance(q, GenRequest)}
        busy |= {q.adapter for q in self._overflow}
        with self._route_lock:
            busy |= set(self.routes.values()) | {c for c, _ in self.canary.values()}
        for internal in sorted(self._retiring - busy):
            if len(self._loaded) == 1:  # PEFT cannot disable its last adapter once deleted: keep it
                break
            try:
                self.model.delete_adapter(internal)
            except Exception:  # noqa: BLE001  (the worker must outlive a failed cleanup)
                log.exception("could not unload a replaced adapter", extra={"internal": internal})
                self._retiring.discard(internal)  # not retried every iteration; it stays in memory
                continue
            del self._loaded[internal]
            self._retiring.discard(internal)
            log.info("adapter unloaded", extra={"internal": internal})

    # ------------------------------------------------------------------ tokenization
    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    # ------------------------------------------------------------------ logprobs
    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's own bytes (a byte-level BPE token may hold part of a UTF-8 character) and
        their text (partial characters as U+FFFD), as OpenAI reports `token` and `bytes`."""
        hit = self._pieces.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = self._byte_decoder
            if piece is None:  # an id past the tokenizer's vocabulary (padded embedding rows)
                raw = b""
            elif table is not None and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
                raw = bytes([int(piece[3:5], 16)])
            else:  # SentencePiece word piece ("\u2581" = space) or an added token
                raw = piece.replace("\u2581", " ").encode()
            hit = self._pieces[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def logprob_entry(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]], as_ids: bool = False
    ) -> dict:
        """OpenAI chat-shaped entry: the token, its logprob, its bytes and the `top` alternatives
        ((token id, logprob) pairs). `as_ids`: token strings are "token_id:N" (vLLM's
        return_tokens_as_token_ids), the bytes stay the token's own."""

        def item(tid: int, lp: float | None) -> dict:
            text, raw = self.token_piece(tid)
            if lp is not None and not lp >= -9999.0:  # -inf and NaN are not JSON (OpenAI: -9999)
                lp = -9999.0
            return {"token": f"token_id:{tid}" if as_ids else text, "logprob": lp, "bytes": raw}

        entry = item(token_id, logprob)
        entry["top_logprobs"] = [item(t, v) for t, v in top]
        return entry

    def logprob_entries(self, logits, token_ids: list[int], tops: list[int], as_ids: list[bool]) -> list[dict]:
        """Entries for row i of `logits` [rows, vocab] choosing token_ids[i], with tops[i]
        alternatives: log-softmax, gather and top-k on the logits' device, one copy to the host."""
        import torch

        lsm = torch.log_softmax(logits.float(), -1)
        chosen = lsm.gather(1, torch.tensor(token_ids, device=lsm.device)[:, None])[:, 0].tolist()
        k = min(max(tops), lsm.shape[-1])
        vals, ids = lsm.topk(k, -1) if k > 0 else (lsm[:, :0], lsm[:, :0].long())
        vals, ids = vals.tolist(), ids.tolist()
        return [
            self.logprob_entry(t, lp, list(zip(ids[i][:top], vals[i][:top])), a)
            for i, (t, lp, top, a) in enumerate(zip(token_ids, chosen, tops, as_ids))
        ]

    def prompt_logprobs(self, logits, prompt_ids: list[int], top: int, as_ids: bool) -> list[dict]:
        """Entries for every prompt token (the first has logprob None) from the prefill logits
        of its positions, [len - 1 (or more), vocab]: row j predicts prompt token j + 1. Done in
        chunks, so no [len, vocab] float32 copy is made at once."""
        out = [self.logprob_entry(prompt_ids[0], None, [], as_ids)]
        for start in range(0, len(prompt_ids) - 1, PROMPT_LOGPROB_CHUNK):
            targets = prompt_ids[start + 1 : start + 1 + PROMPT_LOGPROB_CHUNK]
            out += self.logprob_entries(
                logits[start : start + len(targets)], targets, [top] * len(targets), [as_ids] * len(targets)
            )
        return out


PROMPT_LOGPROB_CHUNK = 512  # prompt positions per log-softmax (bounds the float32 copy)


class _Row:
    """One sequence being generated: a choice of a request."""

    def __init__(self, req: GenRequest, index: int, grammars: Any = None):
        import torch

        self.req, self.index = req, index
        p = req.params
        self.ids: list[int] = []
        self.sent = ""
        self.lp_pending: list[dict] = []  # logprob entries not yet sent with a text delta
        self.bias = self.seen = None  # logit processing tensors, built on first use
        self.scanned = 0  # characters of the decoded text already searched for stop strings
        self.done = False
        self.last_token_at: float | None = None
        self.generator = None
        # one grammar matcher per row (its own parse state); built in the worker thread
        self.matcher = grammars.matcher(p.grammar) if p.grammar is not None else None
        self.bitmask = None
        if not p.greedy:
            seed = (p.seed + index) % 2**64 if p.seed is not None else int.from_bytes(os.urandom(8), "little")
            self.generator = torch.Generator().manual_seed(seed)


class _Chunked:
    """A long prompt being prefilled in chunks: its own cache until the last chunk."""

    def __init__(self, req: GenRequest):
        self.req, self.done, self.cache = req, 0, None


class _Group:
    """The running batch of one model (base or one adapter): rows, KV cache, attention mask.

    Continuous batching: new requests are prefilled on their own and merged into the running
    batch (both left-padded to the same cache length), finished rows are dropped, and every
    `step` decodes one token for all rows. Padding stays on the left of every row, so a 2D
    attention mask plus per-row position ids give the same result as an unbatched run."""

    def __init__(self, engine: Engine, adapter: str | None):
        self.engine, self.adapter = engine, adapter
        self.tok = engine.tokenizer
        self.reset()

    def reset(self) -> None:
        self.rows: list[_Row] = []
        self.prefilling: list[_Chunked] = []  # long prompts being prefilled a chunk per step
        self.cache = self.mask = self.pos = self.logits = None

    @property
    def num_rows(self) -> int:
        return len(self.rows) + sum(c.req.params.n for c in self.prefilling)

    def admit(self, reqs: list[GenRequest]) -> None:
        """Prefill new requests and merge them into the running batch. A request that wants its
        prompt's logprobs is prefilled alone (only it computes logits at every position); a
        prefill that fails fails its own requests, not the running ones."""
        for q in reqs:  # max_tokens 0 (echo without logprobs): nothing to compute
            if q.params.max_tokens == 0 and not q.params.prompt_logprobs:
                q.post(Event([(i, "", "length", []) for i in range(q.params.n)]))
        reqs = [q for q in reqs if q.params.max_tokens > 0 or q.params.prompt_logprobs]
        chunk = self.engine.prefill_chunk_tokens
        long = [q for q in reqs if chunk and not q.params.prompt_logprobs and len(q.prompt_ids) > chunk]
        self.prefilling += [_Chunked(q) for q in long]
        reqs = [q for q in reqs if not any(q is c for c in long)]
        plain = [q for q in reqs if not q.params.prompt_logprobs]
        batches = ([plain] if plain else []) + [[q] for q in reqs if q.params.prompt_logprobs]
        for batch in batches:
            try:
                self._prefill(batch)
            except Exception as exc:  # e.g. out of memory: the running batch is intact
                log.exception("prefill failed")
                for req in batch:
                    req.post(Event([], error=exc))

    def _prefill(self, reqs: list[GenRequest]) -> None:
        import torch

        self._started(reqs)
        rows = [_Row(req, i, self.engine.grammars) for req in reqs for i in range(req.params.n)]
        dev = self.engine.device
        width = max(len(r.req.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = r.req.prompt_ids
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
        echo = reqs[0] if reqs[0].params.prompt_logprobs else None  # then alone (see admit)
        t0 = time.monotonic()
        with torch.inference_mode():
            out = self.engine.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=0 if echo else 1,
            )
        if echo is None:  # what admission predicts prefill from (full-logit echo prefills are not typical)
            self.engine.step_times.add_prefill(int(mask.sum()), time.monotonic() - t0)
        with torch.inference_mode():
            if echo is not None:  # one prompt (n rows of it, left-padding-free): row 0's logits
                p = echo.params
                echo.prompt_logprobs = self.engine.prompt_logprobs(
                    out.logits[0, :-1], echo.prompt_ids, p.logprobs or 0, p.tokens_as_ids
                )
                if p.max_tokens == 0:  # echo only: score the prompt, generate nothing
                    echo.post(Event([(r.index, "", "length", []) for r in rows]))
                    return
        self._merge(rows, _cache_of(out), mask, pos[:, -1:], out.logits[:, -1, :].float())

    def _started(self, reqs: list[GenRequest]) -> None:
        m = self.engine.metrics
        if m is not None:
            now = time.monotonic()
            for req in reqs:
                m.queue_time.labels(req.model).observe(now - req.enqueued_at)
                m.prompt_tokens.labels(req.model).inc(len(req.prompt_ids))

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest long prompt (n rows of it); merged into the batch when done.
        A prefill that fails fails its own request, not the running ones."""
        import torch

        c = self.prefilling[0]
        req, size = c.req, self.engine.prefill_chunk_tokens
        if req.cancelled:
            self.prefilling.pop(0)
            return
        if c.done == 0:
            self._started([req])
        n, dev = req.params.n, self.engine.device
        ids = torch.tensor(req.prompt_ids[c.done : c.done + size], device=dev)[None].expand(n, -1)
        end = c.done + ids.shape[1]
        mask = torch.ones((n, end), dtype=torch.long, device=dev)
        pos = torch.arange(c.done, end, device=dev)[None].expand(n, -1)
        t0 = time.monotonic()
        try:
            with torch.inference_mode():
                out = self.engine.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **({self.engine.cache_kw: c.cache} if c.cache is not None else {}),
                )
        except Exception as exc:  # as in admit: this request fails, the running batch is intact
            log.exception("prefill failed")
            self.prefilling.pop(0)
            req.post(Event([], error=exc))
            return
        c.cache, c.done = _cache_of(out), end
        self.engine.step_times.add_prefill(ids.numel(), time.monotonic() - t0)
        if end == len(req.prompt_ids):
            self.prefilling.pop(0)
            try:
                self._merge(
                    [_Row(req, i, self.engine.grammars) for i in range(n)],
                    c.cache,
                    mask,
                    pos[:, -1:],
                    out.logits[:, -1, :].float(),
                )
            except BaseException as exc:  # in neither rows nor prefilling now: answer it here; the
                req.post(Event([], error=exc))  # batch may be half-merged, so the group fails too
                raise

    def _merge(self, rows: list[_Row], cache, mask, last_pos, logits) -> None:
        """Append prefilled rows (their cache, 2D mask, last position, next-token logits) to the
        running batch, left-padding the shorter side to a common cache length."""
        import torch

        pos = last_pos
        if self.cache is None:
            self.cache, self.mask, self.pos, self.logits = cache, mask, pos, logits
        else:
            t = max(self.mask.shape[1], mask.shape[1])
            _merge_caches(self.cache, cache, t - self.mask.shape[1], t - mask.shape[1])
            self.mask = torch.cat(
                [_left_pad(self.mask, t - self.mask.shape[1], 1), _left_pad(mask, t - mask.shape[1], 1)], dim=0
            )
            self.pos = torch.cat([self.pos, pos], dim=0)
            self.logits = torch.cat([self.logits, logits], dim=0)
        self.rows += rows

    def step(self) -> None:
        """One chunk of a long prompt's prefill (if any), then one decode step for every row."""
        import torch

        if self.prefilling:
            t0 = time.monotonic()
            self._prefill_chunk()
            self.engine._chunk_s += time.monotonic() - t0
        if not self.rows:
            return

        nxt = self._pick(self.logits)
        self._emit(nxt.tolist(), self._logprobs(nxt))
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if not keep:
            prefilling = self.prefilling
            self.reset()
            self.prefilling = prefilling  # long prompts still on their way in
            return
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, device=self.mask.device)
            _select_rows(self.cache, idx)
            self.rows = [self.rows[i] for i in keep]
            self.mask, self.pos, nxt = self.mask[idx], self.pos[idx], nxt[idx.cpu()]
            first = int((self.mask.sum(0) > 0).nonzero()[0])  # drop all-padding columns
            if first > 0:
                _trim_cache(self.cache, first)
                self.mask = self.mask[:, first:]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.pos = self.pos + 1
        with torch.inference_mode():
            out = self.engine.model(
                input_ids=nxt[:, None].to(self.mask.device),
                attention_mask=self.mask,
                position_ids=self.pos,
                use_cache=True,
                **{self.engine.cache_kw: self.cache},
            )
        self.cache, self.logits = _cache_of(out), out.logits[:, -1, :].float()

    def _pick(self, logits):
        """Each row's next token. A row whose sampling raises fails its own request only."""
        nxt = logits.argmax(-1).cpu()
        for i, r in enumerate(self.rows):
            p = r.req.params
            if r.done or (p.greedy and not p.processes_logits):
                continue
            try:
                nxt[i] = self._sample(logits[i], r)
            except Exception as exc:  # noqa: BLE001  (inf/NaN probabilities from this request's parameters)
                self._fail_request(r.req, SamplingFailed(f"{type(exc).__name__}: {exc}"))
        return nxt

    def _fail_request(self, req: GenRequest, exc: BaseException) -> None:
        for r in self.rows:
            if r.req is req:
                r.done = True
        req.post(Event([], error=exc))
        req.cancel()  # no later event for it (other rows of the step may still emit)

    def _sample(self, logits, r: _Row) -> int:
        import torch

        p = r.req.params
        row = self._process(logits, r) if p.processes_logits else logits
        if p.greedy:
            return int(row.argmax())
        row = row / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < row.topk(p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(row, -1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()  # top_p sees the renormalized distribution
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < p.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=r.generator)[0])

    def _logprobs(self, tokens) -> list[dict | None]:
        """The logprob entry of each row's new token (None for rows that did not ask)."""
        out: list[dict | None] = [None] * len(self.rows)
        want = [i for i, r in enumerate(self.rows) if not r.done and r.req.params.logprobs is not None]
        if want:
            params = [self.rows[i].req.params for i in want]
            entries = self.engine.logprob_entries(
                self.logits[want],
                [int(tokens[i]) for i in want],
                [p.logprobs for p in params],
                [p.tokens_as_ids for p in params],
            )
            for i, entry in zip(want, entries):
                out[i] = entry
        return out

    def _process(self, row, r: _Row):
        """Bias, penalties and the grammar's mask on (a copy of) one row's float32 logits."""
        import torch

        p = r.req.params
        vocab = row.shape[-1]
        if r.bias is None:  # dense bias (logit_bias, allowed_token_ids) and the prompt's tokens, once
            r.bias = torch.zeros(vocab, device=row.device)
            if p.allowed_token_ids is not None:
                r.bias.fill_(float("-inf"))
                r.bias[[t for t in p.allowed_token_ids if t < vocab]] = 0.0
            for tid, bias in p.logit_bias.items():
                if tid < vocab:
                    r.bias[tid] += bias
            r.seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
            r.seen[[t for t in r.req.prompt_ids if t < vocab]] = True
        row = row + r.bias
        if len(r.ids) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.engine.eos_ids)
            row[[t for t in stops if t < vocab]] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = r.seen.clone()
            seen[[t for t in r.ids if t < vocab]] = True
            row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        if r.ids and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(r.ids, device=row.device), minlength=vocab)[:vocab].float()
            row -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty
        if r.matcher is not None:  # only the tokens the grammar allows at this point
            import llguidance.torch as llt

            if r.bitmask is None:
                r.bitmask = llt.allocate_token_bitmask(1, vocab)
            llt.fill_next_token_bitmask(r.matcher, r.bitmask, 0)
            # Not llt.apply_token_bitmask_inplace: on CPU it took ~100 ms per row for a 49k
            # vocabulary; unpacking the bits with torch takes well under a millisecond.
            row = row.masked_fill(~_unpack_bitmask(r.bitmask[0], vocab).to(row.device), float("-inf"))
        return row

    def _emit(self, tokens: list[int], logprobs: list[dict | None]) -> None:
        per_req: dict[int, tuple[GenRequest, list]] = {}
        m = self.engine.metrics
        now = time.monotonic()
        generated = 0
        for r, t, lp in zip(self.rows, tokens, logprobs):
            if r.done:
                continue
            if r.req.cancelled:
                r.done = True
                continue
            p = r.req.params
            r.ids.append(t)
            r.req.completion_tokens += 1
            generated += 1
            if m is not None:
                if r.last_token_at is not None:
                    m.itl.labels(r.req.model).observe(now - r.last_token_at)
                if r.req.first_token_at is None:
                    m.ttft.labels(r.req.model).observe(now - r.req.enqueued_at)
            r.last_token_at = now
            if r.req.first_token_at is None:
                r.req.first_token_at = now
            finish = None
            if (t in self.engine.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                r.ids.pop()
                finish = "stop"
            elif r.matcher is not None:
                if not r.matcher.consume_token(t):  # cannot happen: the token was allowed
                    self._fail_request(r.req, SamplingFailed(f"grammar rejected token {t}: {r.matcher.get_error()}"))
                    continue
                if r.matcher.is_stopped():  # the grammar is complete: only the stop token could follow
                    finish = "stop"
            if lp is not None and (finish is None or p.report_stop_token):
                r.lp_pending.append(lp)
            text = self.tok.decode(r.ids, skip_special_tokens=True)
            found = []
            if len(r.ids) >= p.min_tokens:  # only text new since the last step (as vLLM): a stop
                # string that appeared before min_tokens was reached does not count later
                found = [(i, s) for s in p.stop if s for i in [text.find(s, max(0, r.scanned - len(s) + 1))] if i >= 0]
            r.scanned = len(text)
            if found:
                cut, stop = min(found)
                text, finish = text[: cut + (len(stop) if p.include_stop_str_in_output else 0)], "stop"
            elif finish is None and len(r.ids) >= p.max_tokens:
                finish = "length"
            if finish is None:
                text = _hold_back(text, p.stop)
            delta = text[len(r.sent) :] if text.startswith(r.sent) else ""
            r.sent += delta
            if finish:
                r.done = True
            if delta or finish:
                per_req.setdefault(id(r.req), (r.req, []))[1].append((r.index, delta, finish, r.lp_pending))
                r.lp_pending = []
        if m is not None and generated and self.rows:
            m.generation_tokens.labels(self.rows[0].req.model).inc(generated)  # one model per group
        for req, deltas in per_req.values():
            req.post(Event(deltas))


_BIT_SHIFTS = None


def _unpack_bitmask(words, vocab: int):
    """llguidance's packed mask (int32 words, token i = bit i % 32 of word i // 32) -> bool [vocab]."""
    import torch

    global _BIT_SHIFTS
    if _BIT_SHIFTS is None:
        _BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
    return ((words[:, None] >> _BIT_SHIFTS) & 1).reshape(-1)[:vocab].bool()


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: the printable Latin-1 bytes
    as themselves, the other bytes as code points 256, 257, ... in byte order. Returns the
    inverse map, character -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_DECODER = _byte_level_alphabet()


def _is_byte_level(tokenizer) -> bool:
    """Whether the (fast) tokenizer decodes with a ByteLevel decoder (Llama 3, GPT-2 style)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except Exception:  # noqa: BLE001  (a backend that cannot serialize: assume not byte-level)
        return False

    def find(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(find(v) for v in node.values())
        if isinstance(node, list):
            return any(find(v) for v in node)
        return False

    return find(decoder)


def _layers(cache) -> list:
    if not hasattr(cache, "layers"):
        raise RuntimeError("continuous batching needs a layered transformers Cache (transformers >= 4.56)")
    return cache.layers


def _left_pad(t, n: int, dim: int):
    """Prepend n zeros along `dim` (cache: dim 2 = sequence; mask: dim 1)."""
    import torch

    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge_caches(a, b, pad_a: int, pad_b: int) -> None:
    """Append b's rows to a, left-padding each to a common sequence length (in place on a)."""
    import torch

    for la, lb in zip(_layers(a), _layers(b)):
        la.keys = torch.cat([_left_pad(la.keys, pad_a, 2), _left_pad(lb.keys, pad_b, 2)], dim=0)
        la.values = torch.cat([_left_pad(la.values, pad_a, 2), _left_pad(lb.values, pad_b, 2)], dim=0)


def _select_rows(cache, idx) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _trim_cache(cache, first: int) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _cache_of(out):
    # transformers 5.x renamed `past_key_values` to `cache` (outputs and forward arguments).
    return out["cache"] if "cache" in out else out["past_key_values"]


def _hold_back(text: str, stops: list[str]) -> str:
    """Withhold a trailing partial UTF-8 char and any tail that could start a stop string."""
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


def parse_named(items: list[str] | None, what: str) -> dict[str, str]:
    """`NAME=VALUE` pairs (repeatable CLI options) -> dict, with a clear error on bad input."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--{what} {item!r} must look like NAME={'DIR' if what == 'adapter' else 'URL'}")
        if name in out:
            raise ValueError(f"--{what} name {name!r} given twice")
        out[name.strip()] = value.strip()
    return out


def check_adapter_dirs(adapters: dict[str, str]) -> None:
    """Every adapter has both files and they parse, so a bad one stops the server at the start
    instead of leaving it running unready (/health 503) with the error only in the log."""
    from llama_train.adapter import missing_files, unreadable_files

    for name, d in adapters.items():
        if not Path(d).is_dir():
            raise ValueError(f"--adapter {name}={d}: no such directory")
        for f in missing_files(Path(d)):
            raise ValueError(
                f"--adapter {name}={d}: no {f} in {d}; give a PEFT adapter directory "
                "(`llama-train export RUN --format adapter` writes one)"
            )
        problems = unreadable_files(Path(d))
        if problems:
            raise ValueError(f"--adapter {name}={d}: {'; '.join(problems)}")
