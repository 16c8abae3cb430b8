"""Route a served model name to a remote OpenAI-compatible endpoint (`--upstream NAME=URL`).

URL is the endpoint's base URL as an OpenAI client takes it (e.g. http://vllm:8000/v1); an
optional `#REMOTE_MODEL` fragment renames the model in the forwarded body. The key comes from
LLAMA_TRAIN_UPSTREAM_KEY_<NAME> (NAME upper-cased, non-alphanumerics as `_`), else
LLAMA_TRAIN_UPSTREAM_API_KEY, else none. Bodies are forwarded unchanged (except `model`), and
responses, streamed or not, are passed back byte for byte with their status code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from llama_train.serve.schemas import APIError


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    remote_model: str
    api_key: str | None

    @classmethod
    def parse(cls, name: str, url: str, env: dict | None = None) -> Upstream:
        env = os.environ if env is None else env
        url, _, remote = url.partition("#")
        if not re.match(r"^https?://", url):
            raise ValueError(f"--upstream {name}={url}: URL must start with http:// or https://")
        key = env.get(f"LLAMA_TRAIN_UPSTREAM_KEY_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}") or env.get(
            "LLAMA_TRAIN_UPSTREAM_API_KEY"
        )
        return cls(name, url.rstrip("/"), remote or name, key)

    def model_card(self, created: int) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "upstream",
            "root": f"{self.base_url}#{self.remote_model}",
            "parent": None,
        }


async def proxy(client: httpx.AsyncClient, up: Upstream, route: str, body: dict, timeout_s: float) -> Response:
    """POST `body` to `<base_url><route>`; stream the answer back when the client asked to."""
    body = {**body, "model": up.remote_model}
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if up.api_key:
        headers["authorization"] = f"Bearer {up.api_key}"
    request = client.build_request(
        "POST", f"{up.base_url}{route}", content=json.dumps(body), headers=headers, timeout=timeout_s
    )
    try:
        resp = await client.send(request, stream=True)
    except httpx.TimeoutException:
        raise APIError(
            504,
            f"upstream {up.name!r} ({up.base_url}) did not answer within {timeout_s:g} s",
            type="server_error",
            code="upstream_timeout",
        ) from None
    except httpx.HTTPError as exc:
        raise APIError(
            502,
            f"upstream {up.name!r} ({up.base_url}) is unreachable: {type(exc).__name__}",
            type="server_error",
            code="upstream_unreachable",
        ) from None
    media = resp.headers.get("content-type", "application/json")
    if not body.get("stream") or resp.status_code >= 400:
        try:
            content = await resp.aread()
        except httpx.HTTPError as exc:
            raise APIError(
                502,
                f"upstream {up.name!r} broke off its answer: {type(exc).__name__}",
                type="server_error",
                code="upstream_error",
            ) from None
        finally:
            await resp.aclose()
        return Response(content, status_code=resp.status_code, media_type=media)
    return StreamingResponse(
        resp.aiter_raw(),
        status_code=resp.status_code,
        media_type=media,
        headers={"cache-control": "no-cache"},
        background=BackgroundTask(resp.aclose),
    )
