"""The recipe schema: one YAML file drives train, track, export, gate, serve and k8s.

Every field has a description (exported as JSON Schema by `llama-train recipe schema`). Unknown
keys and wrong types are errors naming the full key path and the closest valid key; conflicting
options are errors naming both keys and the fix.

The sections are defined in llama_train.recipe_sections (k8s in llama_train.k8s.config); this
module assembles them into the Recipe, checks options that conflict across sections, and loads,
overrides, dumps and compares recipes.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from llama_train.errors import RecipeError
from llama_train.k8s.config import K8sConfig
from llama_train.recipe_sections import (
    BUILTIN_DATA,
    BUILTIN_PREFERENCES,
    CheckpointConfig,
    DataConfig,
    DPOConfig,
    ExportConfig,
    GateConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    Section,
    TrackingConfig,
    TrainConfig,
)


class Recipe(Section):
    output_dir: str = Field("outputs/run", description="Where checkpoints, adapter and run.json go.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and tokenization.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter (or full fine-tuning).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference tuning (train.objective: dpo).")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Distribution.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export and lint.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Validation gate thresholds.")
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="Kubernetes job rendering.")

    @model_validator(mode="after")
    def _check_conflicts(self) -> Recipe:
        t = self.train
        if t.max_steps is not None and t.epochs is not None:
            raise ValueError("train.max_steps and train.epochs are both set; keep one (e.g. remove train.epochs)")
        if t.max_steps is None and t.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if t.warmup_steps is not None and t.warmup_ratio is not None:
            raise ValueError("train.warmup_steps and train.warmup_ratio are both set; keep one")
        if self.model.source == "hf" and not self.model.path:
            raise ValueError(
                "model.source is `hf` but model.path is empty; set model.path to a local directory or a hub id"
            )
        if self.model.source == "gguf" and not self.model.path:
            raise ValueError("model.source is `gguf` but model.path is empty; set model.path to a .gguf file")
        if self.model.source == "catalogue":
            from llama_train.models.catalogue import CATALOGUE

            if self.model.path not in CATALOGUE:
                raise ValueError(
                    f"model.source is `catalogue` but model.path is {self.model.path!r}; set it "
                    f"to one of: {', '.join(sorted(CATALOGUE))}"
                )
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ValueError(
                "model.quantization (QLoRA) needs lora.enabled: true; a quantized base cannot be fully fine-tuned"
            )
        if t.compile and self.parallel.strategy == "deepspeed":
            raise ValueError(
                "train.compile is not supported with parallel.strategy deepspeed (the engine "
                "wraps the model); use strategy ddp or fsdp, or set train.compile: false"
            )
        if math.log2(t.loss_scale_init) != round(math.log2(t.loss_scale_init)):
            raise ValueError(
                f"train.loss_scale_init must be a power of two (scaling by one is exact in fp16), "
                f"got {t.loss_scale_init}; e.g. 65536"
            )
        if self.data.group_by_length and self.data.packing:
            raise ValueError(
                "data.group_by_length orders unpacked rows by length; with data.packing: true "
                "the rows are already about seq_len long: set one of them to false"
            )
        if self.parallel.strategy == "deepspeed" and self.model.quantization != "none":
            raise ValueError(
                "model.quantization with parallel.strategy deepspeed is not supported; "
                "use strategy ddp or fsdp for QLoRA"
            )
        self._check_objective()
        return self

    def _check_objective(self) -> None:
        d, dpo = self.data, self.dpo
        default = type(dpo)()
        changed = [k for k in type(dpo).model_fields if getattr(dpo, k) != getattr(default, k)]
        if self.train.objective == "sft" and changed:  # (a dumped recipe holds the defaults: those are fine)
            raise ValueError(
                f"dpo.{changed[0]} is set but train.objective is `sft`, which ignores the dpo "
                "section; set train.objective: dpo, or remove the dpo section"
            )
        if self.train.objective == "sft" and self.gate.metric == "preference_accuracy":
            raise ValueError(
                "gate.metric: preference_accuracy needs train.objective: dpo; use exact_match or contains for sft"
            )
        if (
            self.train.objective == "dpo"
            and "metric" in self.gate.model_fields_set
            and self.gate.metric != "preference_accuracy"
        ):
            raise ValueError(
                f"gate.metric is `{self.gate.metric}` but train.objective is `dpo`, which is "
                "gated on held-out pairs: set gate.metric: preference_accuracy (or remove it)"
            )
        if self.train.objective == "sft" and any(s.path == BUILTIN_PREFERENCES for s in d.sources):
            raise ValueError(
                f"data.sources path {BUILTIN_PREFERENCES} holds preference pairs but "
                "train.objective is `sft`; set train.objective: dpo (or use builtin:tasks)"
            )
        prefs = [f"data.sources[{i}]" for i, s in enumerate(d.sources) if s.format == "preference"]
        if self.train.objective == "sft":
            if prefs:
                raise ValueError(
                    f"{prefs[0]}.format is `preference` but train.objective is `sft`; set "
                    "train.objective: dpo to train on preference pairs"
                )
            return
        if any(s.path == BUILTIN_DATA for s in d.sources):
            raise ValueError(
                f"train.objective is `dpo` but data.sources uses {BUILTIN_DATA} (SFT "
                f"conversations); use path: {BUILTIN_PREFERENCES} with format: preference"
            )
        bad = [
            f"data.sources[{i}].format is `{s.format}`"
            for i, s in enumerate(d.sources)
            if s.format != "preference" and s.path != BUILTIN_PREFERENCES
        ]
        if bad:
            raise ValueError(
                f"train.objective is `dpo` but {bad[0]}; DPO trains on {{prompt, chosen, "
                "rejected}} rows: set format: preference"
            )
        if d.eval.format not in (None, "preference"):
            raise ValueError(
                f"train.objective is `dpo` but data.eval.format is `{d.eval.format}`; "
                "set data.eval.format: preference (or leave it unset)"
            )
        if not self.lora.enabled and dpo.reference == "adapter_disabled":
            raise ValueError(
                "dpo.reference: adapter_disabled needs lora.enabled: true; for full fine-tuning "
                "set dpo.reference: frozen_copy (or auto)"
            )
        if self.lora.enabled and dpo.reference == "frozen_copy":
            raise ValueError(
                "dpo.reference: frozen_copy is for full fine-tuning (lora.enabled: false); with LoRA "
                "the base with the adapter disabled is the reference: set dpo.reference: auto"
            )
        if self.lora.enabled and self.lora.modules_to_save:
            raise ValueError(
                "train.objective: dpo with lora.modules_to_save: the reference (adapter disabled) "
                "would still differ in those modules' saved copies; set lora.modules_to_save: []"
            )
        if d.overlength == "truncate":
            raise ValueError(
                "data.overlength: truncate cannot apply to preference pairs (it would cut the "
                "rejected side of a pair); set data.overlength: drop (or error) for train.objective: dpo"
            )
        if d.train_on != "assistant":
            raise ValueError(
                f"data.train_on is `{d.train_on}`; with train.objective: dpo the loss is always on "
                "the completions (chosen and rejected): remove data.train_on"
            )
        if dpo.loss == "ipo" and dpo.label_smoothing:
            raise ValueError(
                "dpo.label_smoothing applies to dpo.loss: sigmoid only; set dpo.label_smoothing: 0 for dpo.loss: ipo"
            )

    def sha256(self) -> str:
        return hashlib.sha256(dump_recipe(self).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _suggest(model_cls: type[BaseModel], loc: tuple, bad: str) -> str:
    """Closest valid key at `loc` (a path into the recipe) for a misspelt key."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cls = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if cls is None:
        return ""
    match = difflib.get_close_matches(bad, list(cls.model_fields), n=1, cutoff=0.5)
    return (
        f"; did you mean `{'.'.join(map(str, (*[p for p in loc], match[0])))}`?"
        if match
        else (f"; valid keys: {', '.join(cls.model_fields)}")
    )


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(recipe)"
        if e["type"] == "extra_forbidden":
            hint = (
                " (YAML needs a space after ':' to read `key: value`)"
                if ":" in str(loc[-1])
                else _suggest(Recipe, loc[:-1], str(loc[-1]))
            )
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            if e["type"] == "string_type" and isinstance(got, (bool, int, float)):
                got_s += f'; YAML read the value as {type(got).__name__}: quote it, e.g. {key.split(".")[-1]}: "..."'
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


class _RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: a key given twice in one mapping is an error (plain YAML keeps the last one,
    silently dropping the first), and dates stay strings (no recipe field is a date)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a plain value, got {type(key).__name__}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (also at line {seen[key] + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506  (a SafeLoader subclass)


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars/flow collections: `1e-4`, `true`, `[q_proj, v_proj]`."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override value {text!r} is not valid YAML: {exc}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like `section.key=value` (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(
                f"override {item!r}: the key {key.strip()!r} is not a dotted recipe key (e.g. train.lr=1e-4)"
            )
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key}: `{'.'.join(parts[: i + 1])}` is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path} (see `llama-train recipe list`)")
    if path.is_dir():
        raise RecipeError(f"recipe path {path} is a directory; give a .yaml file")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise RecipeError(f"recipe {path} is empty; start from one of `llama-train recipe list`")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply dotted overrides, validate. Raises RecipeError (exit code 2)."""
    data = apply_overrides(_read_yaml(Path(path)), list(overrides or []))
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict, *, source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    """Normalized YAML (all defaults filled, stable key order): what is hashed and logged."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def recipe_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama_train recipe"
    return schema


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_recipes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two recipe dicts, as `key: old -> new` lines."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
