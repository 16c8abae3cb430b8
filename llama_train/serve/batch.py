"""The running batch of one model: continuous batching inside the engine's worker thread.

A `Group` holds the rows (one per choice of a request) decoding on one model (the base or one
adapter), with their KV cache and attention mask. New requests are prefilled (long prompts a
chunk per step) and merged in; each step decodes one token for every row, picks each row's
next token (`serve.sampling`), and posts the new text, finish reasons and logprob entries to
the requests (`serve.request.Event`), holding back text that could still become a stop string.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from llama_train.serve.kvcache import cache_of, left_pad, merge_caches, select_rows, trim_cache
from llama_train.serve.request import Event, GenRequest
from llama_train.serve.sampling import SamplingFailed, sample_token

log = logging.getLogger("llama_train.serve")


class Row:
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


class Group:
    """The running batch of one model (base or one adapter): rows, KV cache, attention mask.

    Continuous batching: new requests are prefilled on their own and merged into the running
    batch (both left-padded to the same cache length), finished rows are dropped, and every
    `step` decodes one token for all rows. Padding stays on the left of every row, so a 2D
    attention mask plus per-row position ids give the same result as an unbatched run.

    `engine` is the `serve.engine.Engine` that owns the model (typed Any: that module imports
    this one)."""

    def __init__(self, engine: Any, adapter: str | None):
        self.engine, self.adapter = engine, adapter
        self.tok = engine.tokenizer
        self.reset()

    def reset(self) -> None:
        self.rows: list[Row] = []
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
        rows = [Row(req, i, self.engine.grammars) for req in reqs for i in range(req.params.n)]
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
        self._merge(rows, cache_of(out), mask, pos[:, -1:], out.logits[:, -1, :].float())

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
        c.cache, c.done = cache_of(out), end
        self.engine.step_times.add_prefill(ids.numel(), time.monotonic() - t0)
        if end == len(req.prompt_ids):
            self.prefilling.pop(0)
            try:
                self._merge(
                    [Row(req, i, self.engine.grammars) for i in range(n)],
                    c.cache,
                    mask,
                    pos[:, -1:],
                    out.logits[:, -1, :].float(),
                )
            except BaseException as exc:  # in neither rows nor prefilling now: answer it here; the
                req.post(Event([], error=exc))  # batch may be half-merged, so the group fails too
                raise

    def _merge(self, rows: list[Row], cache, mask, last_pos, logits) -> None:
        """Append prefilled rows (their cache, 2D mask, last position, next-token logits) to the
        running batch, left-padding the shorter side to a common cache length."""
        import torch

        pos = last_pos
        if self.cache is None:
            self.cache, self.mask, self.pos, self.logits = cache, mask, pos, logits
        else:
            t = max(self.mask.shape[1], mask.shape[1])
            merge_caches(self.cache, cache, t - self.mask.shape[1], t - mask.shape[1])
            self.mask = torch.cat(
                [left_pad(self.mask, t - self.mask.shape[1], 1), left_pad(mask, t - mask.shape[1], 1)], dim=0
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
            select_rows(self.cache, idx)
            self.rows = [self.rows[i] for i in keep]
            self.mask, self.pos, nxt = self.mask[idx], self.pos[idx], nxt[idx.cpu()]
            first = int((self.mask.sum(0) > 0).nonzero()[0])  # drop all-padding columns
            if first > 0:
                trim_cache(self.cache, first)
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
        self.cache, self.logits = cache_of(out), out.logits[:, -1, :].float()

    def _pick(self, logits):
        """Each row's next token. A row whose sampling raises fails its own request only."""
        nxt = logits.argmax(-1).cpu()
        for i, r in enumerate(self.rows):
            p = r.req.params
            if r.done or (p.greedy and not p.processes_logits):
                continue
            try:
                nxt[i] = sample_token(logits[i], r, self.engine.eos_ids)
            except Exception as exc:  # noqa: BLE001  (inf/NaN probabilities from this request's parameters)
                self._fail_request(r.req, SamplingFailed(f"{type(exc).__name__}: {exc}"))
        return nxt

    def _fail_request(self, req: GenRequest, exc: BaseException) -> None:
        for r in self.rows:
            if r.req is req:
                r.done = True
        req.post(Event([], error=exc))
        req.cancel()  # no later event for it (other rows of the step may still emit)

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
