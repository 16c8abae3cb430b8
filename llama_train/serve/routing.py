"""Adapters at runtime: which loaded PEFT adapter serves each request, and loading, switching
and unloading adapters while the engine serves.

A served adapter name routes to a PEFT adapter loaded under an internal name; a request is
pinned to the internal name when it is submitted, so it finishes on the weights it started
with, and a replaced adapter is deleted once no request holds it. A canary serves a fraction of
a name's requests. Changes run on the engine's worker thread between steps (it owns the model).
`check_adapter_dirs` checks adapter directories before a server starts or loads them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
from pathlib import Path

from llama_train.serve.request import GenRequest

log = logging.getLogger("llama_train.serve")


class Superseded(RuntimeError):
    """An adapter switch that was overtaken (its name unloaded or replaced meanwhile)."""


class AdapterRoutes:
    """The engine's adapter methods (mixed into `serve.engine.Engine`). They use the engine's
    model, its routing tables (`routes`, `canary`, `adapters`, `adapter_info`, `_loaded`,
    `_versions`, `_retiring`, guarded by `_route_lock`), its request queues (to find adapters
    still in use) and `in_worker` (to run a change on the worker thread)."""

    def _adapter_context(self, adapter: str | None):
        import contextlib

        if adapter is not None:
            self.model.set_adapter(adapter)
            return contextlib.nullcontext()
        if self._loaded:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

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
