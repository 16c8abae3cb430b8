"""`llama-train registry sync`: keep a registry alias's adapter in a directory, for servers that do
not read the registry themselves (a sidecar of the vLLM and NIM Deployments).

Every `poll_s` seconds the reference (models:/NAME@champion) is resolved; a new version is
downloaded and verified against its export manifest (registry.fetch_verified) into a staging
directory, then:
  - vLLM (`vllm_url`): moved to DIR/<lora_name>-v<VERSION> and loaded with vLLM's
    POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace: true} (the server needs
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; key: $VLLM_API_KEY); the previous version's directory is
    deleted once vLLM has the new one; DIR/<lora_name>, what vLLM's --lora-modules loads when its
    container restarts, is replaced with the same version.
  - NIM (no URL): moved to DIR/<lora_name> (the previous one replaced by renames, never
    half-written); NIM picks it up on its own refresh (NIM_PEFT_REFRESH_INTERVAL).
A version that fails verification is not synced and not retried; an unreachable registry or
server is retried next poll.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from llama_train.errors import LlamaTrainError

log = logging.getLogger("llama_train.sync")


class AdapterSync:
    def __init__(self, ref: str, directory: str | Path, *, lora_name: str, uri: str, vllm_url: str | None = None):
        from llama_train.tracking.client import mlflow_client
        from llama_train.tracking.registry import parse_model_ref

        parse_model_ref(ref, flag="registry sync REF")
        self.ref, self.dir, self.lora_name, self.vllm_url = ref, Path(directory), lora_name, vllm_url
        self.client = mlflow_client(uri)
        self.version: str | None = None
        self.refused: set[str] = set()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def sync_once(self) -> bool:
        """One poll; True when the served version is the alias's now. Raises on a refused version
        (VerificationError) and on an unreachable registry or server."""
        from llama_train.tracking.registry import fetch_verified, resolve_model_ref

        name, version = resolve_model_ref(self.ref, client=self.client)
        if version == self.version:
            return True
        if version in self.refused:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / f".staging-{self.lora_name}-v{version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            adapter, verified = fetch_verified(name, version, staging, client=self.client)
        except LlamaTrainError:
            shutil.rmtree(staging, ignore_errors=True)
            self.refused.add(version)
            raise
        if not verified:
            log.warning("%s version %s has no export manifest: synced unverified", name, version)
        if self.vllm_url:
            final = self.dir / f"{self.lora_name}-v{version}"
            shutil.rmtree(final, ignore_errors=True)
            adapter.rename(final)
            shutil.rmtree(staging, ignore_errors=True)
            self._load_in_vllm(final)
            # What vLLM reads at a restart (--lora-modules NAME=DIR/NAME, written first by the init
            # container) follows too, or a restarted vLLM would serve the version of pod start.
            shutil.copytree(final, staging / "current")
            self._replace(staging / "current", self.dir / self.lora_name)
            shutil.rmtree(staging, ignore_errors=True)
            if self.version is not None and self.version != version:
                shutil.rmtree(self.dir / f"{self.lora_name}-v{self.version}", ignore_errors=True)
        else:
            final = self.dir / self.lora_name
            self._replace(adapter, final)
            shutil.rmtree(staging, ignore_errors=True)
        log.info("synced %s version %s to %s", name, version, final)
        self.version = version
        return True

    def _replace(self, new: Path, final: Path) -> None:
        """Put directory `new` at `final`, the previous one replaced by renames (never half-written)."""
        old = self.dir / f".old-{self.lora_name}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _load_in_vllm(self, path: Path) -> None:
        import httpx

        key = os.environ.get("VLLM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"lora_name": self.lora_name, "lora_path": str(path), "load_inplace": True}
        r = httpx.post(f"{self.vllm_url.rstrip('/')}/v1/load_lora_adapter", json=body, headers=headers, timeout=300)
        if r.status_code != 200:
            raise LlamaTrainError(
                f"{self.vllm_url}/v1/load_lora_adapter answered {r.status_code}: {r.text[:300]} "
                "(the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)"
            )

    def run(self, *, poll_s: float) -> None:
        while True:
            try:
                self.sync_once()
            except Exception as exc:  # noqa: BLE001  (a sidecar retries; a refused version is logged once)
                log.error(
                    "sync of %s failed (%s: %s); retrying in %g s", self.ref, type(exc).__name__, str(exc)[:300], poll_s
                )
            time.sleep(poll_s)


def sync_command(
    ref: str,
    *,
    directory: Path,
    lora_name: str | None,
    vllm_url: str | None,
    poll_s: float,
    once: bool,
    tracking_uri: str | None,
) -> None:
    from llama_train.errors import UsageError
    from llama_train.tracking.registry import parse_model_ref

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError("registry sync needs the MLflow registry: set $MLFLOW_TRACKING_URI or pass --tracking-uri")
    if poll_s <= 0:
        raise UsageError(f"--poll-s {poll_s}: give a positive number of seconds")
    name = lora_name or parse_model_ref(ref, flag="registry sync REF")[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sync = AdapterSync(ref, directory, lora_name=name, uri=uri, vllm_url=vllm_url)
    if once:
        if not sync.sync_once():
            raise LlamaTrainError(f"{ref}: the version was refused")
        return
    sync.run(poll_s=poll_s)
