"""Distributed training on CPU: 2 gloo ranks under real torchrun processes (issue 4).

Every strategy (ddp, fsdp, deepspeed ZeRO-2/3 with LoRA; fsdp and ZeRO-3 full fine-tuning) must
reproduce the single-process run with the same global batch (1 rank x micro-batch 4 vs 2 ranks x
micro-batch 2) and seed: per-step losses within LOSS_ATOL and exported weights within WEIGHT_ATOL
(float32 reductions in a different order are the only difference). Runs are cached per session and
reused by tests/integration/test_resume.py as the uninterrupted references.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe

LOSS_ATOL = 1e-5  # absolute, on per-token losses around 2-8
WEIGHT_ATOL = 1e-5  # absolute, on exported float32 weights
RUN_TIMEOUT_S = 300
MAX_STEPS = 6
DS_INSTALLED = __import__("importlib").util.find_spec("deepspeed") is not None

STRATEGIES = {  # name -> (parallel section, lora enabled)
    "ddp": ({"strategy": "ddp"}, True),
    "fsdp": ({"strategy": "fsdp"}, True),
    "zero2": ({"strategy": "deepspeed", "zero_stage": 2}, True),
    "zero3": ({"strategy": "deepspeed", "zero_stage": 3}, True),
    "fsdp_full": ({"strategy": "fsdp"}, False),
    "zero3_full": ({"strategy": "deepspeed", "zero_stage": 3}, False),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(
    tmp_path: Path, tiny_dir, *, lora: bool = True, parallel: dict | None = None, micro_batch_size: int = 4, **sections
) -> dict:
    """The recipe shared by the parity and resume tests: 6 steps, cosine LR with warmup, a
    checkpoint every 2 steps, 1 eval row with a 2-token generation (eval is not under test)."""
    train = {
        "max_steps": MAX_STEPS,
        "micro_batch_size": micro_batch_size,
        "lr": 1e-3 if lora else 1e-4,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "seed": 0,
    }
    train.update(sections.pop("train", {}))
    recipe = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"builtin": {"num_train": 32, "num_eval": 1}, "seq_len": 64, "eval": {"max_new_tokens": 2}},
        train=train,
        lora={"enabled": lora, "r": 8, "alpha": 16},
        parallel=parallel or {"strategy": "single"},
        checkpoint={"every_n_steps": 2, "keep_last_k": 2, "save_final": False},
    )
    for key, value in sections.items():
        base = recipe.setdefault(key, {})
        base.update(value) if isinstance(value, dict) else recipe.__setitem__(key, value)
    return recipe


@dataclass
class Launch:
    returncode: int
    output: str
    out: Path

    def summary(self) -> dict:
        return json.loads((self.out / "run.json").read_text())

    def ledger(self, rank: int) -> list[dict]:
        path = self.out / "ledger" / f"rank{rank}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]


def torchrun(
    recipe: dict,
    workdir: Path,
    *,
    nproc: int = 2,
    fault: str | None = None,
    extra_args: list[str] | None = None,
    env: dict | None = None,
) -> Launch:
    """`python -m llama_train.k8s.launch` (torchrun keeping the failing rank's exit code)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [
        sys.executable,
        "-m",
        "llama_train.k8s.launch",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        *(extra_args or []),
        "-m",
        "llama_train.train",
        str(path),
    ]
    full_env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LLAMA_TRAIN_LEDGER="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **(env or {}),
    )
    full_env.pop("LLAMA_TRAIN_FAULT", None)
    if fault:
        full_env["LLAMA_TRAIN_FAULT"] = fault
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=RUN_TIMEOUT_S)
    return Launch(proc.returncode, proc.stdout + proc.stderr, Path(recipe["output_dir"]))


def train_in_process(recipe: dict, monkeypatch_env: dict | None = None) -> Path:
    """Single-process baseline in this pytest process (saves an interpreter start)."""
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train

    saved = {k: os.environ.get(k) for k in ("LLAMA_TRAIN_LEDGER", "LLAMA_TRAIN_FAULT", "WORLD_SIZE")}
    os.environ["LLAMA_TRAIN_LEDGER"] = "1"
    os.environ.pop("LLAMA_TRAIN_FAULT", None)
    os.environ.pop("WORLD_SIZE", None)
    try:
        train(recipe_from_dict(recipe))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Path(recipe["output_dir"])


class Runs:
    """Session cache of the reference runs (each one runs at most once per session)."""

    def __init__(self, root: Path, tiny_dir):
        self.root, self.tiny_dir, self.cache = root, tiny_dir, {}

    def single(self, lora: bool) -> Path:
        key = f"single_{'lora' if lora else 'full'}"
        if key not in self.cache:
            self.cache[key] = train_in_process(run_recipe(self.root / key, self.tiny_dir, lora=lora))
        return self.cache[key]

    def distributed(self, name: str) -> Launch:
        if name not in self.cache:
            parallel, lora = STRATEGIES[name]
            extra = {}
            if name == "ddp":  # the run that checks rank-0-only tracking
                extra["tracking"] = {
                    "enabled": True,
                    "uri": f"sqlite:///{self.root / 'mlruns.db'}",
                    "experiment": "dist-test",
                    "log_system_metrics": False,
                }
            recipe = run_recipe(
                self.root / name, self.tiny_dir, lora=lora, parallel=parallel, micro_batch_size=2, **extra
            )
            launch = torchrun(recipe, self.root / name)
            assert launch.returncode == 0, launch.output[-4000:]
            self.cache[name] = launch
        return self.cache[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"), tiny_dir)


def losses(out: Path) -> list[float]:
    return [loss for _, loss in json.loads((out / "run.json").read_text())["loss_history"]]


def exported(out: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter/adapter_model.safetensors" if (out / "adapter").exists() else "model/model.safetensors"
    return load_file(str(out / name))


def assert_weights_close(got: dict, want: dict, atol: float = WEIGHT_ATOL) -> None:
    import torch

    assert got, "exported weights are empty"
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].numel() > 0, k
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0), (k, float((got[k] - want[k]).abs().max()))


def _needs(name: str):
    return pytest.mark.skipif(name.startswith("zero") and not DS_INSTALLED, reason="deepspeed not installed")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in STRATEGIES])
def test_matches_single_process(runs, name):
    launch = runs.distributed(name)
    lora = STRATEGIES[name][1]
    base = runs.single(lora)
    got, want = losses(launch.out), losses(base)
    assert len(got) == len(want) == MAX_STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) < LOSS_ATOL, (got, want)
    assert want[-1] < want[0]  # it trains
    assert_weights_close(exported(launch.out), exported(base))


@pytest.mark.slow
def test_only_rank0_writes_and_tracks(runs):
    from mlflow import MlflowClient

    launch = runs.distributed("ddp")
    out = launch.out
    top = sorted(p.name for p in out.iterdir())
    # ledger/ is the per-rank test hook; the rest is rank 0's (tracking.py's local metric mirror too)
    # eval_examples.json: the MLflow table of eval examples, kept for `track sync` (issue 24)
    assert top == [
        "adapter",
        "checkpoints",
        "eval_examples.json",
        "ledger",
        "loss_curve.png",
        "metrics.jsonl",
        "recipe.yaml",
        "run.json",
        "tracking.json",
    ], top
    train_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert train_steps == list(range(1, MAX_STEPS + 1))  # one writer: no step logged twice
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in (out / "checkpoints").iterdir() if ".tmp" in p.name] == []
    # progress lines come from rank 0 only: one line per logged step
    assert launch.output.count(f"step {MAX_STEPS}/{MAX_STEPS}") == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{runs.root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("dist-test")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1
    assert found[0].info.status == "FINISHED"
    assert found[0].data.tags.get("llama_train.world_size") == "2"


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("shutil").which(os.environ.get("CXX", "g++")) is None,
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_fsdp_with_compiled_layers_matches_single_process(runs, tmp_path):
    """train.compile under FSDP2 (layers compiled, then sharded): the same losses and weights as
    the eager single-process run."""
    parallel, lora = STRATEGIES["fsdp"]
    recipe = run_recipe(
        tmp_path, runs.tiny_dir, lora=lora, parallel=parallel, micro_batch_size=2, train={"compile": True}
    )
    launch = torchrun(recipe, tmp_path)
    assert launch.returncode == 0, launch.output[-4000:]
    assert "train.compile: 4 decoder layers compiled" in " ".join(launch.output.split())  # rich wraps lines
    base = runs.single(lora)
    got, want = losses(launch.out), losses(base)
    assert len(got) == len(want) == MAX_STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) < LOSS_ATOL, (got, want)
    assert_weights_close(exported(launch.out), exported(base))


@pytest.mark.slow
def test_epochs_train_every_row_once_with_a_rank_of_fillers(runs, tmp_path):
    """10 rows, global batch 4 (2 ranks x 2), 2 epochs: 3 steps per epoch. The third step has 2 real
    rows, both on rank 0; rank 1 runs filler rows (labels masked) so DDP's collectives still match."""
    recipe = run_recipe(
        tmp_path,
        runs.tiny_dir,
        parallel={"strategy": "ddp"},
        micro_batch_size=2,
        train={"max_steps": None, "epochs": 2},
        data={"builtin": {"num_train": 10, "num_eval": 1}, "seq_len": 64, "eval": {"max_new_tokens": 2}},
    )
    launch = torchrun(recipe, tmp_path)
    assert launch.returncode == 0, launch.output[-3000:]
    ledgers = [launch.ledger(r)[1:] for r in (0, 1)]
    assert [e["step"] for e in ledgers[0]] == list(range(1, 7))
    epochs = [[i for led in ledgers for e in led[k * 3 : (k + 1) * 3] for i in e["ids"]] for k in (0, 1)]
    assert len(epochs[0]) == len(set(epochs[0])) == 10 and set(epochs[0]) == set(epochs[1])  # once per epoch
    assert [len(e["ids"]) for e in ledgers[1]] == [2, 2, 0, 2, 2, 0]  # rank 1: fillers only in step 3
    assert launch.summary()["consumed_samples"] == 20
    assert all(0 < e["loss"] < 20 and not e["skipped"] for e in ledgers[0])


def test_indivisible_batch_fails_before_work(tmp_path, tiny_dir, capsys):
    """`llama-train run --nproc-per-node 2` checks before starting torchrun (every rank re-checks)."""
    from llama_train.launch import launch

    recipe = run_recipe(
        tmp_path, tiny_dir, parallel={"strategy": "ddp"}, micro_batch_size=2, train={"global_batch_size": 6}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = launch(str(path), [], nproc_per_node=2, master_port=free_port())
    err = capsys.readouterr().err
    assert 1 <= code <= 127
    assert "train.global_batch_size" in err and "train.micro_batch_size" in err
    assert not Path(recipe["output_dir"]).exists()  # failed before any work


def test_preflight_rejects_without_starting(tmp_path, tiny_dir):
    from llama_train.config import recipe_from_dict
    from llama_train.errors import PreflightError
    from llama_train.preflight import preflight

    recipe = recipe_from_dict(
        run_recipe(tmp_path, tiny_dir, parallel={"strategy": "ddp"}, train={"global_batch_size": 6})
    )
    with pytest.raises(PreflightError, match="train.global_batch_size"):
        preflight(recipe, world_size=2)
    nccl = recipe_from_dict(run_recipe(tmp_path, tiny_dir, parallel={"strategy": "ddp", "backend": "nccl"}))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PreflightError, match="parallel.backend"):
            preflight(nccl, world_size=2)


def test_memory_estimate_shrinks_with_zero_stage(tmp_path, tiny_dir):
    from llama_train.config import recipe_from_dict
    from llama_train.preflight import estimate_memory

    def est(**parallel):
        r = recipe_from_dict(run_recipe(tmp_path, tiny_dir, lora=False, parallel=parallel))
        return estimate_memory(r, 8)

    ddp, z1, z2, z3 = (
        est(strategy="ddp"),
        est(strategy="deepspeed", zero_stage=1),
        est(strategy="deepspeed", zero_stage=2),
        est(strategy="deepspeed", zero_stage=3),
    )
    assert ddp["optimizer"] > z1["optimizer"] and z1["gradients"] > z2["gradients"] and z2["weights"] > z3["weights"]
    off = est(strategy="deepspeed", zero_stage=3, cpu_offload=True)
    assert off["optimizer"] == 0 and off["weights"] == 0 and off["cpu_offloaded"] > 0
    assert z3["total"] > off["total"]
