"""Export a trained run (or one checkpoint) for serving, after a compatibility lint.

Formats, each in its own folder under the output directory:
  adapter/              adapter_config.json + adapter_model.safetensors, nothing else
  merged/               base + adapter merged (peft `merge_and_unload`), safetensors + tokenizer
  vllm/<name>/          the adapter, plus vllm/lora_modules.json and vllm/serve_command.txt
  nim/<name>/           the adapter in the layout NIM reads from $NIM_PEFT_SOURCE
  manifest.json         sha256 of every exported file, base model, recipe hash, metrics

The lint encodes what vLLM and NIM accept (DESIGN.md "Contracts between stages"); a violation
stops the export unless `allow_incompatible` (or the recipe's `export.allow_incompatible`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_train import adapter
from llama_train import checkpoint as ckpt
from llama_train.adapter_lint import Finding, lint_adapter, required_max_lora_rank
from llama_train.artifacts import MANIFEST_FILE, RUN_SUMMARY_FILE, ExportManifest, RunSummary, TrainingState
from llama_train.config import ExportConfig, format_validation_error, recipe_from_dict
from llama_train.errors import ExportError, ExportRefused, ExportUsageError, RecipeError

FORMATS = ("adapter", "merged", "vllm", "nim")

# --------------------------------------------------------------------------- export


@dataclass
class RunInfo:
    src: Path
    adapter_dir: Path | None
    model_dir: Path | None
    run: RunSummary  # run.json (empty when the run has none, e.g. a checkpoint of a running job)
    recipe_text: str | None
    export: ExportConfig  # the saved recipe's export section, through the schema
    checkpoint_state: TrainingState | None = None  # state.json when `src` is a checkpoint


def _find_up(src: Path, name: str) -> Path | None:
    """A checkpoint `<run>/checkpoints/step_N/` may lack run.json; look in the run directory."""
    for d in (src, src.parent, src.parent.parent):
        if (d / name).is_file():
            return d / name
    return None


def _read_json(path: Path, kind=None):
    """`path` parsed (as `kind`, an artifacts class, when given), or ExportError with the fix."""
    try:
        data = json.loads(path.read_text())
        if kind is not None:
            return kind.from_json(data)
    except (ValueError, OSError) as exc:
        raise ExportError(
            f"{path} is unreadable ({exc}); restore it from the run, or delete it "
            "(export then takes the run's metadata from what else it finds)"
        ) from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object; restore it from the run")
    return data


def resolve_run(src: str | Path) -> RunInfo:
    import yaml

    src = Path(src)
    if not src.is_dir():
        raise ExportError(
            f"{src} is not a directory; give a run directory (with adapter/ and "
            "run.json) or a checkpoint directory (<run>/checkpoints/step_N)"
        )
    model_dir = None
    adapter_dir = adapter.locate(src)
    if adapter_dir is None:
        for cand in (src / "model", src):
            if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
                model_dir = cand
                break
    if adapter_dir is None and model_dir is None:
        raise ExportError(
            f"{src} holds no adapter (adapter/adapter_config.json) and no full model "
            "(model/config.json); has the run finished? (see run.json `status`)"
        )
    run_path = _find_up(src, RUN_SUMMARY_FILE)
    run = _read_json(run_path, RunSummary) if run_path else RunSummary()
    recipe_path = _find_up(src, "recipe.yaml")
    recipe_text = recipe_path.read_text() if recipe_path else None
    try:
        recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
    except yaml.YAMLError as exc:
        raise ExportError(f"{recipe_path} is not valid YAML ({exc}); restore it from the run") from None
    if not isinstance(recipe, dict):
        raise ExportError(f"{recipe_path} is not a recipe (a YAML mapping); restore it from the run")
    # A checkpoint's own state.json (not run.json, which describes the end of the run) says which
    # step its weights are from.
    state = _read_json(src / ckpt.STATE, TrainingState) if (src / ckpt.STATE).is_file() else None
    if state is None and src.parent.name == ckpt.CHECKPOINTS and src.name.startswith("step_"):
        state = TrainingState(step=int(src.name[5:])) if src.name[5:].isdigit() else None
    return RunInfo(src, adapter_dir, model_dir, run, recipe_text, _export_config(recipe, recipe_path), state)


class _ExportSection(BaseModel):
    """A recipe's export section alone (the other sections ignored)."""

    model_config = ConfigDict(extra="ignore")
    export: ExportConfig = Field(default_factory=ExportConfig)


def _export_config(recipe: dict, path: Path | None) -> ExportConfig:
    """The saved recipe's export section, validated by the schema with its defaults. The whole
    recipe is validated when it still matches this version's schema; a recipe written by an
    older version (a field since renamed) stays exportable: only its export section must validate."""
    try:
        return recipe_from_dict(recipe, source=str(path)).export
    except RecipeError:
        pass
    try:
        return _ExportSection.model_validate(recipe).export
    except ValidationError as exc:
        raise ExportError(
            f"{format_validation_error(exc, f'{path} (export section)')}\n"
            "fix the export section of the saved recipe, or pass the values as export options"
        ) from None


def _copy_adapter(adapter_dir: Path, dest: Path) -> None:
    if missing := adapter.missing_files(adapter_dir):
        raise ExportError(
            f"{adapter_dir / missing[0]} is missing; an exported adapter needs {' + '.join(adapter.FILES)}"
        )
    adapter.copy(adapter_dir, dest)


def _base_model(info: RunInfo) -> str:
    base = info.run.base_model
    if not base and info.adapter_dir is not None:
        cfg = _read_json(info.adapter_dir / adapter.CONFIG_FILE)
        base = cfg.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            "cannot tell the base model: run.json has no `base_model` and "
            "adapter_config.json no `base_model_name_or_path`"
        )
    return str(base)


def _export_merged(info: RunInfo, base: str, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    if info.adapter_dir is None:  # full fine-tuning: the model is already merged
        model = AutoModelForCausalLM.from_pretrained(info.model_dir, dtype="auto")
        tok_src = info.model_dir
    else:
        from peft import PeftModel

        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        except (OSError, ValueError) as exc:  # missing directory or hub id (HFValidationError is a ValueError)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300].rstrip(".")
            raise ExportError(
                f"--format merged needs the base model {base!r} (run.json `base_model`), "
                f"which cannot be loaded: {first}. Make it available at that path "
                "(or log in for a gated hub model), or export --format adapter"
            ) from None
        model = PeftModel.from_pretrained(model, str(info.adapter_dir)).merge_and_unload()
        tok_src = info.adapter_dir if (info.adapter_dir / "tokenizer_config.json").exists() else base
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(dest)
    try:
        GenerationConfig.from_pretrained(base if info.adapter_dir else info.model_dir).save_pretrained(dest)
    except OSError:
        pass  # the base has no generation_config.json; save_pretrained wrote the model's own


def _export_vllm(adapter_dir: Path, out: Path, name: str, base: str, r: int, *, final: Path) -> None:
    """Written into `out` (a temporary directory); paths in the files name `final`, where it goes."""
    vdir = out / "vllm"
    _copy_adapter(adapter_dir, vdir / name)
    max_rank = required_max_lora_rank(r)
    module = {"name": name, "path": str(final.resolve() / "vllm" / name), "base_model_name": base}
    (vdir / "lora_modules.json").write_text(
        json.dumps({"lora_modules": [module], "max_lora_rank": max_rank}, indent=2) + "\n"
    )
    cmd = [
        "vllm",
        "serve",
        base,
        "--enable-lora",
        "--max-lora-rank",
        str(max_rank),
        "--lora-modules",
        json.dumps(module),
    ]
    (vdir / "serve_command.txt").write_text(shlex.join(cmd) + "\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_train")
    except PackageNotFoundError:
        return "unknown"


def export_run(
    src: str | Path,
    out_dir: str | Path,
    *,
    formats: Iterable[str] = ("adapter",),
    targets: Iterable[str] | None = None,
    allow_incompatible: bool = False,
    adapter_name: str | None = None,
    force: bool = False,
) -> dict:
    """Export `src` (run or checkpoint directory) to `out_dir` in `formats`; return the manifest.

    A non-empty `out_dir` is refused unless `force`, which replaces it as a whole.

    `targets` defaults to the recipe's `export.targets` (else vllm + nim); the recipe's
    `export.max_lora_rank`, `export.adapter_name` and `export.allow_incompatible` apply too.
    Raises ExportRefused (exit 7) when the lint finds an error and incompatibility is not allowed,
    ExportUsageError (exit 2) for bad arguments, ExportError (exit 1) for missing/unreadable files.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportUsageError(f"unknown export format(s) {bad} (--format); choose from {list(FORMATS)}")
    info = resolve_run(src)
    out = Path(out_dir)
    _check_out(out, info.src, force=force)
    ecfg = info.export
    targets = list(targets if targets is not None else ecfg.targets)
    max_lora_rank = ecfg.max_lora_rank
    allow = allow_incompatible or ecfg.allow_incompatible
    name = adapter_name or ecfg.adapter_name or info.run.run_name or info.src.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
        raise ExportUsageError(
            f"adapter name {name!r} must be letters, digits, '.', '_' or '-' (it is a "
            "directory and a served model name); pass --adapter-name"
        )
    base = _base_model(info)

    adapter_formats = [f for f in formats if f in ("adapter", "vllm", "nim")]
    if info.adapter_dir is None and adapter_formats:
        raise ExportUsageError(
            f"{info.src} is a full fine-tuning run (model/, no adapter); formats "
            f"{adapter_formats} need an adapter: use --format merged"
        )
    if info.adapter_dir is not None:
        unreadable = adapter.unreadable_files(info.adapter_dir)
        if unreadable:  # not a lint finding: --allow-incompatible cannot export a broken file
            raise ExportError("; ".join(unreadable))
    findings = (
        lint_adapter(info.adapter_dir, targets, max_lora_rank=max_lora_rank) if info.adapter_dir is not None else []
    )
    errors = [f for f in findings if f.severity == "error"]
    if errors and not allow:
        lines = "\n".join(f"  - {f}" for f in findings)
        raise ExportRefused(
            f"adapter {info.adapter_dir} is not servable by {targets}:\n{lines}\n"
            "Fix the recipe and retrain, export --format merged, or pass "
            "--allow-incompatible (recipe: export.allow_incompatible: true)"
        )

    r = 0
    if info.adapter_dir is not None:
        r = int(_read_json(info.adapter_dir / adapter.CONFIG_FILE).get("r", 0))
    # Built in a sibling temporary directory and moved into place only when complete: a failure
    # (a missing base model for `merged`, a full disk) leaves any earlier export at `out` untouched,
    # and a replaced export never mixes old files with new ones.
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _staging_dir(out)
    except OSError as exc:
        raise ExportError(
            f"cannot write next to --out {out} ({exc.strerror or exc}); choose a writable --out"
        ) from None
    try:
        for fmt in formats:
            if fmt == "adapter":
                _copy_adapter(info.adapter_dir, tmp / "adapter")
            elif fmt == "merged":
                _export_merged(info, base, tmp / "merged")
            elif fmt == "vllm":
                _export_vllm(info.adapter_dir, tmp, name, base, r, final=out)
            elif fmt == "nim":
                _copy_adapter(info.adapter_dir, tmp / "nim" / name)
        manifest = _manifest(info, tmp, name=name, base=base, formats=formats, targets=targets, r=r, findings=findings)
        manifest.write(tmp / MANIFEST_FILE)
        try:
            _move_into_place(tmp, out)
        except OSError as exc:
            raise ExportError(
                f"cannot move the export into --out {out} ({exc.strerror or exc}); "
                "nothing there was changed unless this names a file"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful move
    return manifest.to_json()


def _check_out(out: Path, src: Path, *, force: bool) -> None:
    """Refuse an --out that would overwrite the source or someone's files; before any work."""
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents or o in s.parents:
        where = "the source" if o == s else "inside the source" if s in o.parents else "a parent of the source"
        raise ExportUsageError(
            f"--out {out} is {where} {src}; export to a directory outside the run, e.g. --out exports/{s.name}"
        )
    if out.exists() and not out.is_dir():
        raise ExportUsageError(f"--out {out} is an existing file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportUsageError(
            f"--out {out} already holds files (an earlier export?); pass --force to "
            "replace it as a whole, or choose another --out"
        )


def _staging_dir(out: Path) -> Path:
    """Where the export is built: beside `out` (then renamed into place), or inside it when `out` is
    a mount point (a volume cannot be renamed or removed). Same permissions as a plain mkdir."""
    parent = out if out.is_dir() and os.path.ismount(out) else out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: a serving container of another uid could not read it
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`. An existing `out` (--force) is renamed aside first and deleted only
    after the new one is in place, so at every moment one complete export sits at `out` or beside it.
    A mount point `out` holds `tmp`: its other entries are replaced by tmp's, one by one."""
    if tmp.parent == out:
        for entry in out.iterdir():
            if entry != tmp and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry != tmp:
                entry.unlink()
        for entry in tmp.iterdir():
            os.replace(entry, out / entry.name)
        tmp.rmdir()
        return
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)  # put the previous export back
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)


def _manifest(
    info: RunInfo,
    root: Path,
    *,
    name: str,
    base: str,
    formats: list[str],
    targets: list[str],
    r: int,
    findings: list[Finding],
) -> ExportManifest:
    files = {
        str(p.relative_to(root)): adapter.sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    run, state = info.run, info.checkpoint_state
    recipe_sha = run.recipe_sha256 or (
        hashlib.sha256(info.recipe_text.encode()).hexdigest() if info.recipe_text else None
    )
    if state is not None:
        # run.json's step, loss and final eval describe the end of the run, not these weights;
        # a checkpoint records its step, its loss and the eval before training.
        before = state.eval_before or (run.eval or {}).get("before")
        if isinstance(before, dict):
            before = {k: v for k, v in before.items() if k != "examples"}
        metrics = {
            "status": "checkpoint",
            "global_step": state.step,
            "train_loss": state.train_loss,
            "eval": {"before": before},
        }
    else:
        metrics = {"status": run.status, "global_step": run.global_step, "train_loss": run.train_loss, "eval": run.eval}
    return ExportManifest(
        llama_train_version=_version(),
        source=str(info.src.resolve()),
        adapter_name=name,
        base_model=base,
        recipe_sha256=recipe_sha,
        run_name=run.run_name,
        formats=formats,
        targets=targets,
        lora_rank=r or None,
        metrics=metrics,
        lint=[asdict(f) for f in findings],
        files=files,
    )


# --------------------------------------------------------------------------- CLI
