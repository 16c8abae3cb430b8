"""`llama-train serve`: run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import logging.config
from pathlib import Path
from typing import Annotated

import typer

from llama_train.errors import LlamaTrainError, PreflightError, UsageError

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_flags(*, base: str, host: str, port: int, dtype: str, device: str, log_level: str) -> None:
    """Everything that can be checked before the server starts: afterwards a failure only shows as
    /health 503 with the error in the log, or as uvicorn's exit 3 (which means data errors here).
    Bad flag values exit 2, a device this machine lacks 4, a missing base model or a busy port 1."""
    if log_level.upper() not in LOG_LEVELS:
        raise UsageError(f"--log-level {log_level!r}: choose from {', '.join(LOG_LEVELS)}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port is 0-65535")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    _check_base(base)
    import socket

    try:  # uvicorn would bind only after the app is built; IPv6 hosts (`::`) included
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as exc:  # socket.gaierror (an unknown --host) is an OSError too
        raise LlamaTrainError(
            f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}; "
            "check --host, or another server may use the port: choose another --port"
        ) from None


def _check_base(base: str) -> None:
    from pathlib import Path

    path = Path(base).expanduser()
    if path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
        if not (path / "config.json").is_file():
            raise LlamaTrainError(
                f"--base {base}: no model directory there (no config.json); give a "
                "directory with config.json + safetensors, or a hub id"
            )
        return
    # A hub id is downloaded at startup unless offline (HF_HUB_OFFLINE=1): then it must be cached.
    import os

    from huggingface_hub import try_to_load_from_cache

    if not any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return

    try:
        cached = try_to_load_from_cache(base, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise LlamaTrainError(
            f"--base {base}: neither a local directory nor a model in the Hugging Face "
            f"cache; download it first (`huggingface-cli download {base}`, with HF_TOKEN "
            "for gated models) or give a directory"
        )


def serve_command(
    base: Annotated[
        str,
        typer.Option(
            "--base", help="Base model: a local directory or a hub id (from the HF cache when HF_HUB_OFFLINE=1)."
        ),
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Repeatable NAME=DIR: a PEFT adapter served as model NAME; or "
            "NAME=models:/MODEL@ALIAS (followed: the server switches when the alias moves) or "
            "NAME=models:/MODEL/VERSION from the MLflow registry (--registry-uri).",
        ),
    ] = None,
    canary: Annotated[
        list[str] | None,
        typer.Option(
            "--canary",
            help="Repeatable NAME=REF:FRACTION: serve FRACTION (between 0 and 1) of adapter NAME's "
            "requests from REF (models:/MODEL@ALIAS, followed like --adapter, or a directory), e.g. "
            "support=models:/support@candidate:0.1.",
        ),
    ] = None,
    registry_uri: Annotated[
        str | None, typer.Option(help="MLflow registry for models:/ adapters (default: $MLFLOW_TRACKING_URI).")
    ] = None,
    registry_poll_s: Annotated[float, typer.Option(help="How often followed aliases are checked, in seconds.")] = 30.0,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_concurrency: Annotated[int, typer.Option(help="Generation requests in flight; more are answered 429.")] = 32,
    request_timeout_s: Annotated[
        float, typer.Option(help="Per-request limit, queueing included, in seconds; then 504.")
    ] = 120.0,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON object per log line (ELK, Loki).")] = False,
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            "--upstream",
            help="Repeatable NAME=URL or NAME=URL#REMOTE_MODEL: proxy model NAME to an "
            "OpenAI-compatible base URL (e.g. http://vllm:8000/v1). Key: "
            "$LLAMA_TRAIN_UPSTREAM_KEY_<NAME> or $LLAMA_TRAIN_UPSTREAM_API_KEY.",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Name of the base model in the API (default: --base as given, like vLLM).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 32,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long the worker gathers requests into a batch, in milliseconds.")
    ] = 5.0,
    prefill_chunk_tokens: Annotated[
        int,
        typer.Option(
            help="Longer prompts are prefilled this many tokens at a time between decode steps, so "
            "one long prompt does not stall other requests (0: whole prompts at once)."
        ),
    ] = 256,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens when a chat request sends none.")] = 256,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="A Jinja chat template file used instead of the tokenizer's (as vLLM's --chat-template), "
            "e.g. one that renders `tools` for a model whose own template does not."
        ),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 4 << 20,
    body_timeout_s: Annotated[
        float,
        typer.Option(
            help="A request body must arrive within this many seconds, else 408 (read before a "
            "concurrency slot is taken)."
        ),
    ] = 30.0,
    drain_timeout_s: Annotated[
        float,
        typer.Option(
            help="On SIGTERM, how long in-flight requests may take to finish before they are cut, in seconds "
            "(keep it below the pod's terminationGracePeriodSeconds, 30 s by default)."
        ),
    ] = 20.0,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Serve a base model and LoRA adapters over an OpenAI-compatible HTTP API.

    API key: $LLAMA_TRAIN_API_KEY (Bearer). Without it the server is open and says so.
    """
    import uvicorn

    from llama_train.serve.app import create_app
    from llama_train.serve.engine import Engine
    from llama_train.serve.observe import log_config
    from llama_train.serve.routing import check_adapter_dirs
    from llama_train.serve.upstream import Upstream

    check_flags(base=base, host=host, port=port, dtype=dtype, device=device, log_level=log_level)
    if prefill_chunk_tokens < 0:
        raise UsageError(f"--prefill-chunk-tokens {prefill_chunk_tokens}: give a token count, or 0 for whole prompts")
    template = None
    if chat_template is not None:
        if not Path(chat_template).is_file():
            raise UsageError(f"--chat-template {chat_template}: no such file")
        template = Path(chat_template).read_text()
    try:
        adapters = parse_named(adapter, "adapter")
        upstreams = {n: Upstream.parse(n, u) for n, u in parse_named(upstream, "upstream").items()}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if registry_poll_s <= 0:
        raise UsageError(f"--registry-poll-s {registry_poll_s}: give a positive number of seconds")
    refs = {n: a for n, a in adapters.items() if a.startswith("models:/")}
    try:
        check_adapter_dirs({n: a for n, a in adapters.items() if n not in refs})
    except ValueError as exc:
        raise LlamaTrainError(str(exc)) from None
    canaries = _parse_canaries(canary, adapters)
    follower, adapter_info = _resolve_registry_adapters(refs, adapters, registry_uri, registry_poll_s)
    cfg = log_config(json_logs, log_level.upper())
    logging.config.dictConfig(cfg)  # before create_app, so its warnings use the format
    logging.captureWarnings(True)  # library warnings become log records (one JSON line each)
    try:
        engine = Engine(
            base,
            adapters,
            served_model_name=served_model_name,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            prefill_chunk_tokens=prefill_chunk_tokens,
            default_max_tokens=default_max_tokens,
            adapter_info=adapter_info,
            chat_template=template,
        )
        engine.follower, follower.engine = follower, engine
        _install_canaries(engine, follower, canaries)
        app = create_app(
            engine,
            upstreams=upstreams,
            max_concurrency=max_concurrency,
            request_timeout_s=request_timeout_s,
            max_body_bytes=max_body_bytes,
            body_timeout_s=body_timeout_s,
        )
    except ValueError as exc:
        raise LlamaTrainError(str(exc)) from None
    config = uvicorn.Config(
        app, host=host, port=port, log_config=cfg, access_log=False, timeout_graceful_shutdown=drain_timeout_s
    )
    _draining_server_class()(config).run()


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


def _parse_canaries(items: list[str] | None, adapters: dict[str, str]) -> dict[str, tuple[str, float]]:
    """--canary NAME=REF:FRACTION -> {NAME: (REF, FRACTION)}, with the flag named on bad input."""
    out = {}
    try:
        named = parse_named(items, "canary")
    except ValueError as exc:
        raise UsageError(f"{exc} (NAME=REF:FRACTION, e.g. support=models:/support@candidate:0.1)") from None
    for name, value in named.items():
        ref, _, fraction = value.rpartition(":")
        try:
            share = float(fraction)
        except ValueError:
            share = -1.0
        if not ref or not 0 < share < 1:
            raise UsageError(
                f"--canary {name}={value}: end it with :FRACTION between 0 and 1, e.g. "
                f"{name}=models:/{name}@candidate:0.1"
            )
        if name not in adapters:
            raise UsageError(f"--canary {name}: no --adapter {name} to split; serve it with --adapter {name}=...")
        out[name] = (ref, share)
    return out


def _install_canaries(engine, follower, canaries: dict[str, tuple[str, float]]) -> None:
    """Fetch (and verify) each canary now; it is installed as soon as the model has loaded."""
    import logging

    from llama_train.serve.routing import check_adapter_dirs

    log = logging.getLogger("llama_train.serve")
    for name, (ref, share) in canaries.items():
        if ref.startswith("models:/"):
            path, info = _fetch(follower, f"--canary {name}", ref)
            follower.follow(name, ref, info["version"], path, canary_fraction=share)
        else:
            try:
                check_adapter_dirs({name: ref})
            except ValueError as exc:
                raise LlamaTrainError(str(exc).replace("--adapter", "--canary")) from None
            path, info = ref, {}

        def report(future, name=name, ref=ref):
            if future.exception() is not None:
                log.error(
                    "canary adapter did not load", extra={"model": name, "ref": ref, "error": repr(future.exception())}
                )

        engine.install_adapter(name, path, source=ref, info=info, canary_fraction=share).add_done_callback(report)


def _fetch(follower, flag: str, ref: str):
    try:
        return follower.fetch(ref)
    except LlamaTrainError as exc:
        raise LlamaTrainError(f"{flag}={ref}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (MlflowException, connection errors)
        raise LlamaTrainError(
            f"{flag}={ref}: fetching it from the registry {follower.uri} failed "
            f"({type(exc).__name__}: {str(exc)[:300]}); check --registry-uri / "
            "$MLFLOW_TRACKING_URI and that the MLflow server is up"
        ) from None


def _resolve_registry_adapters(refs: dict[str, str], adapters: dict[str, str], uri: str | None, poll_s: float):
    """Download and verify the models:/ adapters now (replacing their entries in `adapters` by
    local directories), so a bad reference stops the server at the start; the follower then
    follows the aliases."""
    import os

    from llama_train.serve.follow import RegistryFollower
    from llama_train.tracking.registry import parse_model_ref

    follower = RegistryFollower(None, uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or None, poll_s=poll_s)
    info = {}
    for name, ref in refs.items():
        try:
            parse_model_ref(ref, flag=f"--adapter {name}")
        except LlamaTrainError as exc:
            raise UsageError(str(exc)) from None
        path, info[name] = _fetch(follower, f"--adapter {name}", ref)
        adapters[name] = str(path)
        follower.follow(name, ref, info[name]["version"], path)
    return follower, info


def _draining_server_class():
    import contextlib

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM / SIGINT: stop accepting, let in-flight requests finish (up to
        --drain-timeout-s), stop the engine, exit 0. uvicorn >= 0.29 re-raises the signal after
        its graceful shutdown, so the process would die of SIGTERM (exit -15 / 143): a crash in
        every Kubernetes rollout. A drained shutdown is a clean exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # runs before uvicorn's re-raise of the captured signals
                    self._captured_signals.clear()

    return DrainingServer
