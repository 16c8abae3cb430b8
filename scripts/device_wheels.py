"""Python packages the GPU machine lacks, carried to it as wheels (it has torch, transformers, peft
and accelerate, but not pydantic, which llama_train.config and the serving schemas import).

    python scripts/device_wheels.py download          # here: wheels for CPython 3.10-3.13 into .devwheels/
    python3 scripts/device_wheels.py unpack /tmp/pyd  # on the device: unpack what it lacks, then
                                                      # PYTHONPATH=.:/tmp/pyd
The device tool carries `.devwheels` when the run names it in `carry` (it is git-ignored).
"""

from __future__ import annotations

import glob
import importlib.util
import subprocess
import sys
import zipfile

WHEEL_DIR = ".devwheels"
PURE = ("pydantic", "annotated-types", "typing-inspection", "typing-extensions")


def download() -> None:
    import pydantic
    import pydantic_core

    pins = {"pydantic": pydantic.VERSION}
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", WHEEL_DIR]
    for minor in ("310", "311", "312", "313"):
        subprocess.run(
            pip
            + [
                "--only-binary=:all:",
                "--python-version",
                minor,
                "--platform",
                "manylinux_2_17_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                f"pydantic-core=={pydantic_core.__version__}",
            ],
            check=True,
        )
    subprocess.run(pip + [f"{p}=={pins[p]}" if p in pins else p for p in PURE], check=True)


def unpack(target: str) -> None:
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for wheel in sorted(glob.glob(f"{WHEEL_DIR}/*.whl")):
        name, _version, pytag = wheel.rsplit("/", 1)[1][:-4].split("-")[:3]
        if pytag in ("py3", tag) and importlib.util.find_spec(name.lower()) is None:
            zipfile.ZipFile(wheel).extractall(target)
            print("unpacked", wheel)


if __name__ == "__main__":
    if sys.argv[1:2] == ["download"]:
        download()
    elif sys.argv[1:2] == ["unpack"] and len(sys.argv) == 3:
        unpack(sys.argv[2])
    else:
        sys.exit(__doc__)
