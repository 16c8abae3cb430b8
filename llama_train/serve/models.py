"""The model list and vLLM's adapter endpoints: GET /v1/models (the base, its adapters with
their registry version and canary, the upstream routes) and POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (load, replace, canary or unload an adapter while serving).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from llama_train.errors import LlamaTrainError
from llama_train.serve.engine import Engine
from llama_train.serve.observe import Metrics
from llama_train.serve.routing import check_adapter_dirs
from llama_train.serve.schemas import APIError
from llama_train.serve.upstream import Upstream

ADAPTER_OP_TIMEOUT_S = 600  # a load or unload waits this long for the worker thread


def _registry_card(info: dict | None) -> dict:
    """/v1/models fields of an adapter from the registry: its model name, version and alias."""
    if not info or not info.get("registry_name"):
        return {}
    card = {
        "root": info["source"],
        "registry": {k: info.get(k) for k in ("registry_name", "version", "alias", "verified")},
    }
    if info.get("canary"):
        c = info["canary"]
        card["canary"] = {k: c.get(k) for k in ("registry_name", "version", "alias", "verified", "fraction")}
    return card


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


class Models:
    """/v1/models and the adapter endpoints, over the engine (None: upstream routes only)."""

    def __init__(self, engine: Engine | None, upstreams: dict[str, Upstream], metrics: Metrics, created: int):
        self.engine, self.upstreams, self.metrics, self.created = engine, upstreams, metrics, created

    def model_cards(self) -> list[dict]:
        cards = []
        if self.engine is not None:
            e = self.engine
            cards.append(
                {
                    "id": e.base_id,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama_train",
                    "root": e.base,
                    "parent": None,
                }
            )
            cards += [
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama_train",
                    "root": path,
                    "parent": e.base_id,
                    **_registry_card(e.adapter_info.get(name)),
                }
                for name, path in list(e.adapters.items())
            ]
        cards += [u.model_card(self.created) for u in self.upstreams.values()]
        return cards

    def unknown_model(self, name: str) -> APIError:
        known = ", ".join(c["id"] for c in self.model_cards())
        return APIError(
            404, f"The model `{name}` does not exist; served models: {known}", param="model", code="model_not_found"
        )

    # ------------------------------------------------------------------ adapters at runtime (vLLM's API)
    async def load_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/load_lora_adapter {lora_name, lora_path}; lora_path may be a models:/
        reference (an alias is then followed). Extensions: load_inplace (replace a served adapter,
        vLLM >= 0.10), canary_fraction (serve it to that fraction of lora_name's requests)."""
        body = await _json_object(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        for key, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value.strip():
                raise APIError(
                    400,
                    f"{key} is required: a non-empty string (lora_path: an adapter directory or models:/NAME@ALIAS)",
                    param=key,
                    code="invalid_value",
                )
        fraction = body.get("canary_fraction")
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
        ):
            raise APIError(
                400,
                f"canary_fraction {fraction!r}: give a number between 0 and 1 (0.1 = 10% of the requests)",
                param="canary_fraction",
                code="invalid_value",
            )
        engine = self._adapter_engine()
        if name == engine.base_id or name in self.upstreams:
            raise APIError(
                400,
                f"lora_name {name!r} is the base model's or an upstream's name; choose another",
                param="lora_name",
                code="invalid_value",
            )
        if fraction is not None and name not in engine.adapters:
            raise APIError(
                404,
                f"The lora adapter '{name}' cannot be found: load it before its canary",
                param="lora_name",
                code="model_not_found",
            )
        if fraction is None and name in engine.adapters and not body.get("load_inplace"):
            raise APIError(
                400,
                f"The lora adapter '{name}' has already been loaded. Unload it first, "
                "or send load_inplace: true to replace it",
                param="lora_name",
                code="invalid_value",
            )
        follower = engine.follower
        if path.startswith("models:/"):
            if follower is None:
                raise APIError(
                    400,
                    "this server has no registry (start it with --registry-uri or $MLFLOW_TRACKING_URI)",
                    param="lora_path",
                    code="invalid_value",
                )
            try:
                local, info = await asyncio.to_thread(follower.fetch, path)
            except LlamaTrainError as exc:
                raise APIError(400, str(exc), param="lora_path", code="invalid_value") from None
            except Exception as exc:  # noqa: BLE001  (registry unreachable)
                raise APIError(
                    503,
                    f"the registry did not answer ({type(exc).__name__}); retry",
                    type="server_error",
                    code="registry_unavailable",
                ) from None
        else:
            try:
                check_adapter_dirs({name: path})
            except ValueError as exc:
                raise APIError(
                    400, str(exc).replace(f"--adapter {name}=", "lora_path "), param="lora_path", code="invalid_value"
                ) from None
            local, info = path, {}
        # Stop following what this replaces before switching, so a poll that is downloading a
        # version of it cannot switch back over this load (from review).
        detached = [] if follower is None else follower.detach(name, canary=fraction is not None, main=fraction is None)
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(
                    engine.install_adapter(name, local, source=path, info=info, canary_fraction=fraction)
                ),
                timeout=ADAPTER_OP_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001  (does not load on this base)
            if follower is not None:
                follower.reattach(detached)  # the old one serves on, and is followed again
                if path.startswith("models:/"):
                    follower.release_path(local)  # the download that did not load
            raise APIError(
                400,
                f"lora_path {path}: the adapter did not load ({type(exc).__name__}: {str(exc)[:300]})",
                param="lora_path",
                code="invalid_value",
            ) from None
        if follower is not None:
            follower.release(detached)
            if path.startswith("models:/"):
                follower.follow(name, path, info["version"], local, canary_fraction=fraction)
        self.metrics.add_models([name])
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/unload_lora_adapter {lora_name}; extension: canary_only."""
        body = await _json_object(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise APIError(
                400, "lora_name is required: the served adapter's name", param="lora_name", code="invalid_value"
            )
        engine = self._adapter_engine()
        follower = engine.follower
        # detached first: a poll downloading a new version of it must not bring it back
        detached = [] if follower is None else follower.detach(name, main=not body.get("canary_only"))
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(engine.remove_adapter(name, canary_only=bool(body.get("canary_only")))),
                timeout=ADAPTER_OP_TIMEOUT_S,
            )
        except KeyError:
            if follower is not None:
                follower.reattach(detached)
            raise APIError(
                404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found"
            ) from None
        if follower is not None:
            follower.release(detached)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _adapter_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(
                400, "this server only proxies upstreams: no local model to load adapters into", code="invalid_value"
            )
        if not self.engine.ready.is_set():
            raise APIError(
                503,
                "the model is still loading; retry when /ready answers 200",
                type="server_error",
                code="model_not_ready",
            )
        return self.engine
