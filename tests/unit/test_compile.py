"""train.compile (regional torch.compile of every decoder layer): the same losses and weights as eager."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama_train.config import recipe_from_dict
from llama_train.errors import RecipeError
from llama_train.trainer import train

from ..conftest import tiny_recipe

pytestmark = pytest.mark.slow  # inductor compiles (a minute): after the fast tier in .ci/run

needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU (inductor) needs a C++ compiler"
)


def _run(tmp_path, tiny_dir, *, compiled: bool):
    recipe = tiny_recipe(
        tmp_path / ("compiled" if compiled else "eager"),
        tiny_dir,
        model={"attn_implementation": "doc_sdpa"},  # packed rows, per-document attention (eager inside)
        data={"packing": True, "seq_len": 128, "builtin": {"num_train": 48, "num_eval": 2}},
        lora={"dropout": 0.0},
        train={"max_steps": 4, "micro_batch_size": 2, "compile": compiled},
    )
    summary = train(recipe_from_dict(recipe))
    out = tmp_path / ("compiled" if compiled else "eager") / "run"
    losses = [loss for _, loss in summary["loss_history"]]
    return summary, losses, load_file(out / "adapter" / "adapter_model.safetensors")


@needs_cxx
def test_compiled_layers_train_like_eager(tmp_path, tiny_dir, capsys):
    from torch._dynamo.utils import counters

    _, eager_losses, eager_w = _run(tmp_path, tiny_dir, compiled=False)
    graphs_before = counters["stats"]["unique_graphs"]
    summary, losses, weights = _run(tmp_path, tiny_dir, compiled=True)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the layers really were compiled
    assert "train.compile: 4 decoder layers compiled" in " ".join(capsys.readouterr().err.split())
    assert len(losses) == len(eager_losses) == 4
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert set(weights) == set(eager_w)  # regional compilation keeps the parameter names
    for k in eager_w:
        torch.testing.assert_close(weights[k], eager_w[k], rtol=1e-4, atol=1e-5)
    assert summary["status"] == "completed" and summary["eval"]["after"]  # eval and generation ran (eagerly)


def test_compile_refused_with_deepspeed(tmp_path, tiny_dir):
    with pytest.raises(RecipeError, match="train.compile"):
        recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, train={"compile": True}, parallel={"strategy": "deepspeed"}))


_KERNEL_SCRIPT = """
import sys
import torch
from llama_train.model import isolate_inductor_cache
from torch._inductor.runtime.cache_dir_utils import cache_dir
if sys.argv[1] == "isolate":
    cache_dir()  # inductor used earlier in the process (it then sets TORCHINDUCTOR_CACHE_DIR itself)
    isolate_inductor_cache()
def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
x, w = torch.randn(4, 64, 128), torch.randn(128)
torch.testing.assert_close(torch.compile(rms)(x, w), rms(x, w))
print("kernel ok")
"""


@needs_cxx
def test_cpu_kernel_families_do_not_share_inductor_kernels(tmp_path):
    """Inductor's cache key omits the CPU kernel family: kernels that another program generated under
    a forced ATEN_CPU_CAPABILITY=avx2 in the shared default directory fail to compile under `default`
    and abort the process on an avx512 host. Our compilation uses a directory per family, so a forced
    family and then the host's own one both work after such a program (all on one temp dir)."""
    import subprocess
    import sys

    from torch._inductor import cpu_vec_isa

    if not any("avx2" in str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()):
        pytest.skip("needs an x86 CPU with AVX2 to force two kernel families")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)  # inductor's default cache lives under the temp dir
    for mode, capability in (("plain", "avx2"), ("isolate", "default"), ("isolate", None)):
        run_env = {**env, "ATEN_CPU_CAPABILITY": capability} if capability else env
        proc = subprocess.run(
            [sys.executable, "-c", _KERNEL_SCRIPT, mode], capture_output=True, text=True, env=run_env, timeout=600
        )
        assert proc.returncode == 0 and "kernel ok" in proc.stdout, (mode, capability, proc.stderr[-2000:])
    host = torch.backends.cpu.get_cpu_capability().lower()
    assert {p.name for p in tmp_path.glob("torchinductor_*/aten_cpu_*")} == {"aten_cpu_default", f"aten_cpu_{host}"}
