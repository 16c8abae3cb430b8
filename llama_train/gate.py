"""Validation gate: no adapter reaches serving unless it beats the base and does not regress the
champion.

`run_gate(candidate, ...)` runs, in order, and stops at the first failing stage (later stages are
reported as skipped):
  1. format    file set, safetensors only, sha256 manifest intact, serving-target lint
  2. load      PEFT loads the adapter on the base; every weight finite
  3. quality   held-out loss/perplexity and task metric for candidate, base and champion (a DPO
               candidate: preference accuracy on the held-out pairs, reward margin, DPO loss);
               thresholds gate.min_improvement_over_base and gate.max_regression_vs_champion
  4. behaviour generations (chat template) are non-empty and end at end-of-turn within budget
  5. serving   the inference server starts with the adapter and answers the OpenAI client
The checks are in gate_checks.py; this module resolves the candidate (a directory or a registry
reference) and its recipe, runs them, and writes and logs the report. The report (JSON + Markdown) is written next to the candidate and logged to MLflow. With
`promote=True` and a pass, alias `champion` moves to the candidate (old champion → `previous`);
a failure never moves an alias.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama_train import adapter
from llama_train.artifacts import MANIFEST_FILE, ExportManifest
from llama_train.config import Recipe, TrackingConfig, load_recipe
from llama_train.errors import GateError, LlamaTrainError
from llama_train.gate_checks import (
    Candidate,
    Check,
    check_behaviour,
    check_format,
    check_load,
    check_quality,
    check_serving,
    first_line,
)

STAGES = ("format", "load", "quality", "behaviour", "serving")


@dataclass
class GateReport:
    candidate: str
    adapter_dir: str
    passed: bool = False
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # {"candidate": {...}, "base": {...}, "champion": {...}}
    promoted: dict | None = None
    model_version: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"# Gate report: {verdict}", "", f"Candidate: `{self.candidate}`", ""]
        lines += ["| check | status | details |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.status} | {c.message.replace('|', '/').replace(chr(10), ' ')} |")
        if self.figures:
            metrics = sorted({k for v in self.figures.values() for k in v})
            lines += ["", "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
            for who in ("candidate", "base", "champion"):
                if who in self.figures:
                    vals = [_fmt(self.figures[who].get(m)) for m in metrics]
                    lines.append(f"| {who} | " + " | ".join(vals) + " |")
        if self.promoted:
            lines += ["", f"Promoted: {self.promoted}"]
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


# ------------------------------------------------------------------------------------------------
# Candidate resolution


def _read_manifest(path: Path) -> tuple[ExportManifest | None, str | None]:
    """(manifest, None), (None, None) when there is none, or (None, why it is unreadable)."""
    if not path.exists():
        return None, None
    try:
        return ExportManifest.read(path), None
    except (ValueError, OSError) as exc:
        return None, f"{path.name} is unreadable ({exc}); re-export the candidate"


def resolve_candidate(ref: str, *, tracking_uri: str | None, report_dir: Path | None) -> Candidate:
    if ref.startswith("models:/"):
        from llama_train.tracking.registry import download_adapter

        name, version = _registry_ref(ref, tracking_uri)
        try:
            local = download_adapter(f"models:/{name}/{version}", uri=tracking_uri)
        except LlamaTrainError:
            raise
        except Exception as exc:  # MlflowException: version missing, registry unreachable
            from llama_train.tracking.client import is_not_found

            missing = is_not_found(exc)
            why = f"version {version} does not exist on model {name}" if missing else first_line(exc)
            raise GateError(
                f"{ref}: {why} (registry {tracking_uri or 'from the environment'}); "
                "check the name and version, or pass --tracking-uri"
            ) from None
        manifest, error = _read_manifest(local / MANIFEST_FILE)
        return Candidate(
            ref, local, manifest, report_dir or Path.cwd() / "gate-report", name, version, manifest_error=error
        )
    path = Path(ref)
    if not path.is_dir():
        raise GateError(f"candidate {ref} is neither a directory nor a models:/NAME/VERSION reference")
    manifest, error = _read_manifest(path / MANIFEST_FILE)
    adapter_dir = path / adapter.DIR_NAME if (path / adapter.DIR_NAME).is_dir() else path
    return Candidate(ref, adapter_dir, manifest, report_dir or path, manifest_error=error)


def _registry_ref(ref: str, tracking_uri: str | None) -> tuple[str, str]:
    from llama_train.tracking.registry import get_alias_version

    body = ref.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        version = get_alias_version(name, alias, uri=tracking_uri)
        if version is None:
            raise GateError(f"{ref}: alias `{alias}` does not exist on model {name}")
        return name, version
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise GateError(f"{ref}: use models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version


def find_recipe(candidate: Candidate, recipe_path: str | None) -> Recipe:
    if recipe_path:
        return load_recipe(recipe_path)
    places = []
    if candidate.manifest and candidate.manifest.source:
        src = Path(candidate.manifest.source)
        places += [src / "recipe.yaml", src.parent / "recipe.yaml", src.parent.parent / "recipe.yaml"]
    places += [candidate.adapter_dir.parent / "recipe.yaml"]
    for p in places:
        if p.is_file():
            return load_recipe(p)
    raise GateError(f"no recipe found for candidate {candidate.ref}; pass --recipe RECIPE")


# ------------------------------------------------------------------------------------------------
# Orchestration


def _champion(tracking: TrackingConfig, c: Candidate, tracking_uri: str | None) -> tuple[str | None, Path | None]:
    """(version, local dir) of the registry's current champion, unless it is the candidate itself."""
    name = c.registry_name or tracking.registered_model_name
    if not name:
        return None, None
    from llama_train.tracking.registry import download_adapter, get_alias_version

    try:
        version = get_alias_version(name, "champion", uri=tracking_uri)
    except Exception:  # no registry reachable: judged against the base only, and said so
        return None, None
    if version is None or version == c.version:
        return None, None
    return version, download_adapter(f"models:/{name}/{version}", uri=tracking_uri)


def run_gate(
    ref: str,
    *,
    recipe_path: str | None = None,
    promote: bool = False,
    serving: bool = True,
    tracking_uri: str | None = None,
    report_dir: Path | None = None,
) -> GateReport:
    if report_dir is not None and report_dir.exists() and not report_dir.is_dir():
        raise GateError(f"--report-dir {report_dir} is an existing file; give a directory")
    c = resolve_candidate(ref, tracking_uri=tracking_uri, report_dir=report_dir)
    try:
        recipe = find_recipe(c, recipe_path)
    except GateError:
        if not c.manifest_error:
            raise
        recipe = None  # the broken manifest is what names the run (and its recipe)
    # Usage problems are found before the checks (minutes on a real model), not after them.
    if recipe is None:
        report = GateReport(candidate=ref, adapter_dir=str(c.adapter_dir), model_version=c.version)
        report.checks = [
            Check(
                "format",
                "failed",
                f"{c.manifest_error} (without it no recipe was found: pass --recipe to run the other format checks)",
            )
        ]
        report.checks += [
            Check(s, "skipped", "an earlier check failed") for s in STAGES[1:] if s != "serving" or serving
        ]
        _write_report(report, c.report_dir)
        return report
    if promote and not (c.registry_name or recipe.tracking.registered_model_name):
        raise GateError(
            "--promote needs a registered model: a models:/ candidate or tracking.registered_model_name in the recipe"
        )
    try:
        c.report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GateError(f"cannot create the report directory {c.report_dir} ({exc}); pass --report-dir") from None
    tracking_uri = tracking_uri or _tracking_uri(recipe)
    report = GateReport(candidate=ref, adapter_dir=str(c.adapter_dir), model_version=c.version)
    checks = report.checks
    checks.append(check_format(c, recipe))
    loaded = None
    if checks[-1].status == "passed":
        check, loaded = check_load(c, recipe)
        checks.append(check)
    if loaded is not None:
        champ_version, champ_dir = _champion(recipe.tracking, c, tracking_uri)
        check, report.figures = check_quality(loaded, recipe, champ_dir)
        if champ_version:
            check.figures["champion_version"] = champ_version
        checks.append(check)
        if check.status == "passed":
            checks.append(check_behaviour(loaded, recipe))
        if checks[-1].status == "passed" and serving:
            checks.append(check_serving(loaded, c))
    done = {ch.name for ch in checks}
    checks += [
        Check(s, "skipped", "an earlier check failed") for s in STAGES if s not in done and (s != "serving" or serving)
    ]
    report.passed = all(ch.status == "passed" for ch in checks)
    if report.passed and promote:
        report.promoted = _promote(c, recipe, tracking_uri, report)
    _write_report(report, c.report_dir)
    _log_report(report, c, recipe, tracking_uri)
    return report


def _tracking_uri(recipe: Recipe) -> str:
    from llama_train.tracking.client import resolve_uri

    return resolve_uri(recipe)


def _promote(c: Candidate, recipe: Recipe, tracking_uri: str, report: GateReport) -> dict:
    from llama_train.tracking.registry import promote

    name = c.registry_name or recipe.tracking.registered_model_name
    if not name:
        raise GateError(
            "--promote needs a registered model: a models:/ candidate or tracking.registered_model_name in the recipe"
        )
    version = c.version or _register_export(c, recipe, name, tracking_uri)
    report.model_version = version
    return promote(name, version, uri=tracking_uri)


def _register_export(c: Candidate, recipe: Recipe, name: str, tracking_uri: str) -> str:
    """An export directory becomes a model version (through a gate run holding its files)."""
    from llama_train.tracking.client import resolve_experiment
    from llama_train.tracking.registry import register_export

    return register_export(
        c.adapter_dir,
        name=name,
        uri=tracking_uri,
        experiment=resolve_experiment(recipe.tracking),
        run_name=f"gate-{c.adapter_dir.name}",
    )


def _write_report(report: GateReport, out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gate_report.json").write_text(report.to_json() + "\n")
        (out / "gate_report.md").write_text(report.to_markdown())
    except OSError as exc:
        raise GateError(f"cannot write the gate report to {out} ({exc.strerror or exc}); pass --report-dir") from None


def _log_report(report: GateReport, c: Candidate, recipe: Recipe, tracking_uri: str) -> None:
    """Best effort: a gate run in the recipe's experiment with the report and the figures."""
    if not recipe.tracking.enabled:
        return
    try:
        from llama_train.tracking.client import (
            ensure_experiment,
            mlflow_client,
            resolve_experiment,
        )

        client = mlflow_client(tracking_uri)  # short HTTP timeouts: a dead server costs seconds
        exp_id = ensure_experiment(client, resolve_experiment(recipe.tracking), uri=tracking_uri)
        run = client.create_run(
            exp_id,
            run_name="gate",
            tags={"llama_train.gate.candidate": report.candidate, "llama_train.gate.passed": str(report.passed)},
        )
        for who, figs in report.figures.items():
            for k, v in figs.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    client.log_metric(run.info.run_id, f"gate/{who}/{k}", float(v))
        client.log_artifact(run.info.run_id, str(c.report_dir / "gate_report.json"))
        client.log_artifact(run.info.run_id, str(c.report_dir / "gate_report.md"))
        client.set_terminated(run.info.run_id, "FINISHED" if report.passed else "FAILED")
        name = c.registry_name or recipe.tracking.registered_model_name
        if name and report.model_version:
            client.set_model_version_tag(name, report.model_version, "llama_train.gate.passed", str(report.passed))
    except Exception as exc:  # tracking is never fatal
        print(f"warning: gate report not logged to MLflow ({tracking_uri}): {first_line(exc)}", file=sys.stderr)
