"""The typed hand-offs between stages, each with its JSON form:

  TrainingState   a checkpoint's state.json: the loop's counters (trainer → checkpoint → resume, export)
  RunSummary      <output_dir>/run.json: how the run ended (trainer → export, gate, a rerun)
  ExportManifest  <export>/manifest.json: what was exported, with hashes (export → gate)

Writers build the dataclass and call `to_json`; readers call `from_json`, which takes files written
by earlier versions (missing fields get their defaults) and ignores fields it does not know (a
newer version's), and raises ValueError naming the field when a known field has the wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

RUN_SUMMARY_FILE = "run.json"
MANIFEST_FILE = "manifest.json"

_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _check(cls, name: str, value) -> None:
    """`value` fits the annotation of `cls.name` (`int`, `float | None`, `dict | None`, ...)."""
    if value is None:
        return
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    allowed = tuple(t for a in args for t in _JSON_TYPES[a.__name__])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in args):
        raise ValueError(f"{cls.__name__}.{name} is {type(value).__name__} {value!r}, not {hint}")


class _Json:
    """to_json / from_json for a flat dataclass of JSON values."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} is {type(data).__name__}, not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for k, v in values.items():
            _check(cls, k, v)
        return cls(**values)

    @classmethod
    def read(cls, path: Path):
        """Parse `path`; OSError and ValueError (JSON, a field's type) propagate for the caller to word."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass
class TrainingState(_Json):
    """The loop's counters, saved in every checkpoint (state.json) and restored on resume."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    eval_before: dict | None = None
    tracking_run_id: str | None = None
    recipe_sha256: str | None = None
    world_size: int = 1
    dataset_fingerprint: str | None = None
    train_loss: float | None = None  # mean loss of the last applied step: the checkpoint's weights
    loss_scale: float | None = None  # fp16 dynamic loss scaling (step.LossScaler)
    loss_scale_good_steps: int = 0
    loader: dict | None = None  # StepLoader.state_dict(): where the next step's samples come from
    strategy: str | None = None  # parallel.strategy that wrote the checkpoint

    def restore(self, saved: TrainingState, *, keep: tuple[str, ...] = ()) -> None:
        """Take every field from `saved` (a checkpoint's state) except those named in `keep`."""
        for f in dataclasses.fields(self):
            if f.name not in keep:
                setattr(self, f.name, getattr(saved, f.name))


@dataclass
class RunSummary(_Json):
    """run.json: the end of a training run. `train()` returns its JSON form."""

    status: str | None = None  # "completed"
    objective: str | None = None  # train.objective
    global_step: int | None = None
    train_loss: float | None = None
    train_loss_first: float | None = None
    loss_history: list | None = None  # [step, loss] of the steps this process ran
    eval: dict | None = None  # {"before": ..., "after": ...}
    base_model: str | None = None
    recipe_sha256: str | None = None
    run_name: str | None = None
    world_size: int | None = None
    strategy: str | None = None
    consumed_samples: int | None = None
    consumed_tokens: int | None = None
    train_runtime_s: float | None = None
    supervised_tokens_total: int | None = None
    supervised_tokens_per_s: float | None = None
    data: dict | None = None
    tracking_run_id: str | None = None
    adapter_dir: str | None = None  # LoRA runs
    model_dir: str | None = None  # full fine-tuning
    registered_version: str | None = None  # tracking.registered_model_name set

    _OPTIONAL = ("adapter_dir", "model_dir", "registered_version")  # absent from run.json when unset

    def to_json(self) -> dict:
        return {k: v for k, v in super().to_json().items() if v is not None or k not in self._OPTIONAL}


@dataclass
class ExportManifest(_Json):
    """manifest.json: every exported file's sha256, where it came from, and the run's metrics."""

    llama_train_version: str | None = None
    source: str | None = None
    adapter_name: str | None = None
    base_model: str | None = None
    recipe_sha256: str | None = None
    run_name: str | None = None
    formats: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    lora_rank: int | None = None
    metrics: dict = field(default_factory=dict)
    lint: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # relative path -> sha256
