"""System-tier fixtures: the trainer and server images, built once per session with podman."""

from __future__ import annotations

import pytest

from . import containers


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    containers.require_tools()
    logs = tmp_path_factory.mktemp("images")
    containers.require_runtime(logs / "base.log")
    return containers.build_images(logs / "build.log")
