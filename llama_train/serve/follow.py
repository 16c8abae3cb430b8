"""Adapters served from the MLflow model registry, followed by alias.

`--adapter support=models:/support@champion` is resolved and downloaded at start; then a thread
polls the registry every `poll_s` seconds. When the alias points at another version (the gate
promoted one, `llama-train registry rollback` moved it back), that version is downloaded,
checked against its export manifest's sha256 and loaded beside the one serving; only then does
the served name switch to it (Engine.install_adapter). Requests already running finish on the
old weights. A version that fails to download, verify or load is not switched to, is logged
and counted (llama_train_adapter_switches_total{result="failed"}), and is not retried until the
alias moves again. A registry that cannot be reached is counted
(llama_train_registry_poll_errors_total) and polled again: serving goes on.

The registry URI comes from --registry-uri or $MLFLOW_TRACKING_URI (credentials from MLflow's
own environment variables), never from a recipe.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_train.errors import LlamaTrainError
from llama_train.serve.routing import Superseded

log = logging.getLogger("llama_train.serve")


@dataclass
class Followed:
    name: str  # the served model name
    ref: str  # models:/NAME@ALIAS (followed) or models:/NAME/VERSION (pinned)
    version: str | None
    path: Path | None = None
    canary_fraction: float | None = None
    failed: set[str] = field(default_factory=set)  # versions refused: not retried
    missing: bool = False  # the alias is gone (said once)

    @property
    def alias(self) -> str | None:
        from llama_train.tracking.registry import parse_model_ref

        return parse_model_ref(self.ref)[2]


class RegistryFollower:
    def __init__(self, engine: Any, *, uri: str | None, poll_s: float = 30.0, cache_dir: str | Path | None = None):
        self.engine, self.uri, self.poll_s = engine, uri, poll_s
        # MLflow's download progress bars on stderr would break JSON log lines
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="llama-train-adapters-"))
        self._entries: dict[tuple[str, bool], Followed] = {}  # (name, canary?) -> entry
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._down = False

    @property
    def client(self):
        if self.uri is None:
            raise LlamaTrainError(
                "a models:/ adapter needs the MLflow registry: set $MLFLOW_TRACKING_URI "
                "or pass --registry-uri (e.g. http://mlflow:5000)"
            )
        if self._client is None:
            from llama_train.tracking.client import mlflow_client

            self._client = mlflow_client(self.uri)
        return self._client

    # ------------------------------------------------------------------ resolve and download
    def fetch(self, ref: str) -> tuple[Path, dict]:
        """(local adapter dir, info) of the version `ref` points at now, verified. Raises
        LlamaTrainError (bad reference, missing alias or version, VerificationError) or MLflow's
        exception (registry unreachable)."""
        from llama_train.tracking.registry import parse_model_ref, resolve_model_ref

        _, _, alias = parse_model_ref(ref)
        name, version = resolve_model_ref(ref, client=self.client)
        return self._download(name, version, ref=ref, alias=alias)

    def _download(self, name: str, version: str, *, ref: str, alias: str | None) -> tuple[Path, dict]:
        from llama_train.tracking.registry import fetch_verified

        dst = self.cache_dir / f"{_safe(name)}-v{version}-{uuid.uuid4().hex[:8]}"
        try:
            path, verified = fetch_verified(name, version, dst, client=self.client)
        except BaseException:
            shutil.rmtree(dst, ignore_errors=True)
            raise
        if not verified:
            log.warning("adapter has no export manifest: not verified", extra={"ref": ref, "version": version})
        return path, {"registry_name": name, "version": version, "alias": alias, "source": ref, "verified": verified}

    # ------------------------------------------------------------------ followed names
    def follow(
        self,
        name: str,
        ref: str,
        version: str | None,
        path: Path | None = None,
        *,
        canary_fraction: float | None = None,
    ) -> None:
        with self._lock:
            self._entries[(name, canary_fraction is not None)] = Followed(name, ref, version, path, canary_fraction)

    def unfollow(self, name: str, *, canary: bool = True, main: bool = True) -> None:
        self.release(self.detach(name, canary=canary, main=main))

    def detach(self, name: str, *, canary: bool = True, main: bool = True) -> list[Followed]:
        """Stop following `name` (its canary, its main reference, or both) and return the entries:
        a poll already downloading a version for them will not switch to it (`_switch` asks)."""
        with self._lock:
            keys = [(name, True)] * canary + [(name, False)] * main
            return [e for e in (self._entries.pop(k, None) for k in keys) if e is not None]

    def reattach(self, entries: list[Followed]) -> None:
        """Follow detached entries again (a replacement that failed to load), unless replaced."""
        with self._lock:
            for e in entries:
                self._entries.setdefault((e.name, e.canary_fraction is not None), e)

    def release_path(self, path) -> None:
        """Delete one download (a version that was fetched but not installed)."""
        self._discard(Path(path))

    def release(self, entries: list[Followed]) -> None:
        """Delete the downloads of detached entries (the engine has their weights in memory)."""
        for e in entries:
            self._discard(e.path)

    def _discard(self, path: Path | None) -> None:
        """Delete a downloaded version (the engine has its weights in memory by now)."""
        if path is not None and self.cache_dir in path.parents:
            top = self.cache_dir / path.relative_to(self.cache_dir).parts[0]
            shutil.rmtree(top, ignore_errors=True)

    # ------------------------------------------------------------------ polling
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llama-train-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.engine.ready.is_set():
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001  (the thread must outlive any one poll)
                    log.exception("registry poll failed")

    def poll_once(self) -> None:
        from llama_train.tracking.registry import resolve_model_ref

        with self._lock:
            entries = [e for e in self._entries.values() if e.alias is not None]
        for entry in entries:
            if self._stop.is_set():
                return
            try:
                name, version = resolve_model_ref(entry.ref, client=self.client)
            except LlamaTrainError as exc:  # the alias was deleted: keep serving what we have
                if not entry.missing:
                    log.warning(
                        "registry alias not found; serving the current version",
                        extra={"model": entry.name, "ref": entry.ref, "error": str(exc)},
                    )
                entry.missing = True
                continue
            except Exception as exc:  # noqa: BLE001  (unreachable: try again next poll)
                self._unreachable(exc)
                return
            self._reachable()
            entry.missing = False
            if version != entry.version and version not in entry.failed:
                self._switch(entry, name, version)

    def _switch(self, entry: Followed, registry_name: str, version: str) -> None:
        metrics = self.engine.metrics
        try:
            path, info = self._download(registry_name, version, ref=entry.ref, alias=entry.alias)
        except LlamaTrainError as exc:  # verification failed: refused for good
            self._failed(entry, version, exc)
            return
        except Exception as exc:  # noqa: BLE001  (the registry went away mid-download)
            self._unreachable(exc)
            return
        key = (entry.name, entry.canary_fraction is not None)

        def still_wanted() -> bool:  # not unloaded or replaced while the version downloaded and loaded
            with self._lock:
                return self._entries.get(key) is entry

        try:
            self.engine.install_adapter(
                entry.name,
                path,
                source=entry.ref,
                info=info,
                canary_fraction=entry.canary_fraction,
                still_wanted=still_wanted,
            ).result(timeout=600)
        except Superseded:
            self._discard(path)
            log.info(
                "registry switch dropped: the adapter was unloaded or replaced meanwhile",
                extra={"model": entry.name, "ref": entry.ref, "version": version},
            )
            return
        except Exception as exc:  # noqa: BLE001  (does not load: refused, the old one serves on)
            self._discard(path)
            self._failed(entry, version, exc)
            return
        old, entry.version, entry.path = entry.path, version, path
        self._discard(old)
        if metrics is not None:
            metrics.adapter_switches.labels(entry.name, "switched").inc()
        log.info(
            "adapter follows the registry",
            extra={"model": entry.name, "ref": entry.ref, "version": version, "verified": info["verified"]},
        )

    def _failed(self, entry: Followed, version: str, exc: BaseException) -> None:
        entry.failed.add(version)
        if self.engine.metrics is not None:
            self.engine.metrics.adapter_switches.labels(entry.name, "failed").inc()
        log.error(
            "adapter version refused; the current one keeps serving",
            extra={
                "model": entry.name,
                "ref": entry.ref,
                "version": version,
                "serving": entry.version,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )

    def _unreachable(self, exc: BaseException) -> None:
        if self.engine.metrics is not None:
            self.engine.metrics.registry_errors.inc()
        if not self._down:
            log.warning(
                "registry unreachable; serving the current adapters and polling again",
                extra={"uri": self.uri, "error": f"{type(exc).__name__}: {str(exc)[:300]}"},
            )
        self._down = True

    def _reachable(self) -> None:
        if self._down:
            log.info("registry reachable again", extra={"uri": self.uri})
        self._down = False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
