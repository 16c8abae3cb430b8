"""Model, adapters and the batching worker behind the HTTP server.

One base model with N PEFT adapters loaded side by side (`load_adapter(dir, name)`). A single
worker thread owns the model and batches continuously: each iteration it admits the queued
requests (up to `max_batch_size` sequences; when idle it first waits `batch_wait_ms` to gather
a batch), prefills them, merges them into the running batch of their model, and decodes one
token for every running batch (`set_adapter(name)`, or `disable_adapter()` for the base).
Tokens go back to each request's asyncio queue as they are produced, so streaming and
non-streaming share one path and a request never waits for another to finish.

The engine's parts: `serve.request` (what is submitted and what comes back), `serve.batch`
(one model's running batch: prefill, decode, stop handling), `serve.sampling` (the sampling
parameters, logit processing), `serve.kvcache`, `serve.tokens` (prompt ids, logprob entries)
and `serve.routing` (adapters loaded, switched and unloaded at runtime). The names a caller
needs to submit requests are importable from here.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import logging
import queue
import random
import threading
import time
from typing import Any

from llama_train.serve.admission import Pending, StepTimes, admits
from llama_train.serve.batch import Group
from llama_train.serve.request import AdapterGone, Event, GenRequest, ShuttingDown
from llama_train.serve.routing import AdapterRoutes, Superseded, check_adapter_dirs
from llama_train.serve.sampling import SamplingFailed, SamplingParams
from llama_train.serve.tokens import BYTE_DECODER, Tokens, is_byte_level

__all__ = [
    "AdapterGone",
    "Engine",
    "Event",
    "GenRequest",
    "SamplingFailed",
    "SamplingParams",
    "ShuttingDown",
    "Superseded",
    "check_adapter_dirs",
]

log = logging.getLogger("llama_train.serve")

_WAKE = object()  # put on the request queue to wake an idle worker for an adapter command


class Engine(AdapterRoutes, Tokens):
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
        self._byte_decoder = BYTE_DECODER if is_byte_level(tok) else None
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
        groups: dict[str | None, Group] = {}
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
                group = groups.setdefault(adapter, Group(self, adapter))
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

    def _guarded(self, group: Group, fn, *args) -> None:
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
