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
The report (JSON + Markdown) is written next to the candidate and logged to MLflow. With
`promote=True` and a pass, alias `champion` moves to the candidate (old champion → `previous`);
a failure never moves an alias.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama_train import adapter
from llama_train.config import Recipe, load_recipe
from llama_train.errors import GateError, LlamaTrainError

REPORT_FILES = {"manifest.json", "gate_report.json", "gate_report.md"}
STAGES = ("format", "load", "quality", "behaviour", "serving")


@dataclass
class Check:
    name: str
    status: str  # passed | failed | skipped
    message: str = ""
    figures: dict = field(default_factory=dict)


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


@dataclass
class Candidate:
    ref: str
    adapter_dir: Path
    manifest: dict | None
    report_dir: Path
    registry_name: str | None = None
    version: str | None = None
    manifest_error: str | None = None  # manifest.json exists but cannot be read: a failed format check


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) when there is none, or (None, why it is unreadable)."""
    if not path.exists():
        return None, None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return None, f"{path.name} is unreadable ({exc}); re-export the candidate"
    if not isinstance(manifest, dict):
        return None, f"{path.name} is not a JSON object; re-export the candidate"
    return manifest, None


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
            why = f"version {version} does not exist on model {name}" if missing else _first_line(exc)
            raise GateError(
                f"{ref}: {why} (registry {tracking_uri or 'from the environment'}); "
                "check the name and version, or pass --tracking-uri"
            ) from None
        manifest, error = _read_manifest(local / "manifest.json")
        return Candidate(
            ref, local, manifest, report_dir or Path.cwd() / "gate-report", name, version, manifest_error=error
        )
    path = Path(ref)
    if not path.is_dir():
        raise GateError(f"candidate {ref} is neither a directory nor a models:/NAME/VERSION reference")
    manifest, error = _read_manifest(path / "manifest.json")
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
    if candidate.manifest and candidate.manifest.get("source"):
        src = Path(candidate.manifest["source"])
        places += [src / "recipe.yaml", src.parent / "recipe.yaml", src.parent.parent / "recipe.yaml"]
    places += [candidate.adapter_dir.parent / "recipe.yaml"]
    for p in places:
        if p.is_file():
            return load_recipe(p)
    raise GateError(f"no recipe found for candidate {candidate.ref}; pass --recipe RECIPE")


# ------------------------------------------------------------------------------------------------
# Checks


def check_format(c: Candidate, recipe: Recipe) -> Check:
    from llama_train.export import lint_adapter

    problems = [c.manifest_error] if c.manifest_error else []
    present = {p.name for p in c.adapter_dir.iterdir() if p.is_file()}
    missing, extra = set(adapter.FILES) - present, present - set(adapter.FILES) - REPORT_FILES
    if missing:
        problems.append(f"missing {sorted(missing)}")
    if extra:
        problems.append(f"unexpected files {sorted(extra)} (only {sorted(adapter.FILES)}; no .bin/.pt)")
    tampered = []
    if c.manifest is not None:
        base = c.adapter_dir.parent if (c.adapter_dir.parent / "manifest.json").exists() else c.adapter_dir
        for rel, digest in c.manifest.get("files", {}).items():
            p = base / rel
            if not p.is_file() or adapter.sha256_file(p) != digest:
                tampered.append(rel)
        if tampered:
            problems.append(f"sha256 mismatch against manifest.json: {tampered} (file changed after export)")
    # A truncated safetensors or broken JSON fails here, whatever the recipe's export.targets,
    # rather than crashing the lint or the load check.
    unreadable = adapter.unreadable_files(c.adapter_dir)
    problems += unreadable
    findings = (
        []
        if unreadable
        else [
            f
            for f in lint_adapter(c.adapter_dir, recipe.export.targets, max_lora_rank=recipe.export.max_lora_rank)
            if f.severity == "error"
        ]
    )
    problems += [str(f) for f in findings]
    figures = {
        "manifest": c.manifest is not None,
        "lint_errors": len(findings),
        "tampered": tampered,
        "unreadable": len(unreadable),
    }
    if problems:
        return Check("format", "failed", "; ".join(problems), figures)
    note = "" if c.manifest is not None else " (no manifest.json: hashes not checked)"
    return Check("format", "passed", f"file set ok, lint ok for {recipe.export.targets}{note}", figures)


@dataclass
class Loaded:
    model: object  # PeftModel with adapters "candidate" (+ "champion")
    tokenizer: object
    base_path: str


def check_load(c: Candidate, recipe: Recipe) -> tuple[Check, Loaded | None]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from llama_train.model import load_base_model, load_tokenizer, resolve_base_path

    base_path = (c.manifest or {}).get("base_model") or resolve_base_path(recipe)
    weights = load_file(str(c.adapter_dir / adapter.WEIGHTS_FILE))
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if not weights:
        return Check("load", "failed", "adapter_model.safetensors holds no tensors (empty adapter)"), None
    try:
        tokenizer = load_tokenizer(recipe, base_path)
        base = load_base_model(recipe, base_path)
        model = PeftModel.from_pretrained(base, str(c.adapter_dir), adapter_name="candidate")
    except Exception as exc:  # shape mismatch, missing keys, unreadable config
        return Check("load", "failed", f"PEFT could not load the adapter on {base_path}: {_first_line(exc)}"), None
    if bad:
        return Check(
            "load",
            "failed",
            f"non-finite (NaN/Inf) values in {len(bad)} tensor(s), e.g. {bad[0]}",
            {"non_finite_tensors": len(bad)},
        ), None
    model.eval()
    n = sum(v.numel() for v in weights.values())
    return (
        Check(
            "load",
            "passed",
            f"{len(weights)} tensors ({n:,} values) loaded on {base_path}, all finite",
            {"tensors": len(weights), "values": n},
        ),
        Loaded(model, tokenizer, base_path),
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def _eval_adapter(loaded: Loaded, recipe: Recipe, data, adapter: str | None) -> dict:
    from llama_train.evaluate import evaluate
    from llama_train.model import TrainModule

    if recipe.train.objective == "dpo":
        from llama_train.dpo import DPOModule, eval_preferences

        d = recipe.dpo
        if adapter is not None:
            loaded.model.set_adapter(adapter)
        module = DPOModule(
            loaded.model,
            beta=d.beta,
            loss=d.loss,
            label_smoothing=d.label_smoothing,
            policy_is_reference=adapter is None,
            chunk_size=recipe.train.loss_chunk_size,
        )
        return eval_preferences(
            module,
            data.eval,
            pad_id=loaded.tokenizer.pad_token_id,
            batch_size=recipe.train.micro_batch_size,
            device="cpu",
            attn_implementation=getattr(loaded.model.config, "_attn_implementation", None) or "sdpa",
        )
    module = TrainModule(loaded.model, chunk_size=recipe.train.loss_chunk_size)
    if adapter is None:
        with loaded.model.disable_adapter():
            result = evaluate(module, loaded.tokenizer, data.eval, data.eval_rows, recipe=recipe, device="cpu")
    else:
        loaded.model.set_adapter(adapter)
        result = evaluate(module, loaded.tokenizer, data.eval, data.eval_rows, recipe=recipe, device="cpu")
    result.pop("examples", None)
    return result


def check_quality(loaded: Loaded, recipe: Recipe, champion_dir: Path | None) -> tuple[Check, dict]:
    from llama_train.data.dataset import load_data

    data = load_data(recipe, loaded.tokenizer)
    if not data.eval:
        return Check("quality", "failed", "the recipe has no held-out eval data (data.eval)"), {}
    figures = {
        "candidate": _eval_adapter(loaded, recipe, data, "candidate"),
        "base": _eval_adapter(loaded, recipe, data, None),
    }
    if champion_dir is not None:
        loaded.model.load_adapter(str(champion_dir), adapter_name="champion")
        figures["champion"] = _eval_adapter(loaded, recipe, data, "champion")
        loaded.model.set_adapter("candidate")
    g = recipe.gate
    # a DPO candidate is gated on held-out pairs: the share whose chosen side it prefers
    metric = "preference_accuracy" if recipe.train.objective == "dpo" else g.metric
    cand, base = figures["candidate"][metric], figures["base"][metric]
    problems = []
    if not cand - base >= g.min_improvement_over_base:
        problems.append(
            f"{metric} {cand:.4f} does not beat the base ({base:.4f}) by "
            f"gate.min_improvement_over_base={g.min_improvement_over_base}"
        )
    if "champion" in figures:
        champ = figures["champion"][metric]
        if champ - cand > g.max_regression_vs_champion:
            problems.append(
                f"{metric} {cand:.4f} regresses the champion ({champ:.4f}) by more than "
                f"gate.max_regression_vs_champion={g.max_regression_vs_champion}"
            )
    if not math.isfinite(figures["candidate"]["loss"]):
        problems.append("candidate eval loss is not finite")
    summary = ", ".join(f"{who} {metric} {f[metric]:.4f} loss {f['loss']:.4f}" for who, f in figures.items())
    return Check(
        "quality",
        "failed" if problems else "passed",
        "; ".join(problems) or summary,
        {who: {metric: f[metric], "loss": f["loss"]} for who, f in figures.items()},
    ), figures


def check_behaviour(loaded: Loaded, recipe: Recipe, *, num_prompts: int = 8) -> Check:
    """Greedy generations through the chat template must be non-empty and stop at end-of-turn.
    One left-padded batch with a KV cache (a finished row is padded after its stop token)."""
    import torch

    from llama_train.data.chat import prompt_ids
    from llama_train.data.dataset import load_data
    from llama_train.evaluate import stop_token_ids

    tok = loaded.tokenizer
    data = load_data(recipe, tok)
    convs = [r["messages"] for r in data.eval_rows if r.get("messages")][:num_prompts]
    stops = set(stop_token_ids(tok))
    loaded.model.set_adapter("candidate")
    empty, unstopped = 0, 0
    prompts = [prompt_ids(conv, tok, chat_template=recipe.data.chat_template) for conv in convs]
    if prompts:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=recipe.gate.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(stops),
            )
        for row in out[:, width:].tolist():
            text = tok.decode(row, skip_special_tokens=True).strip()
            empty += not text
            unstopped += not any(t in stops for t in row)
    figures = {"prompts": len(convs), "empty": empty, "no_end_of_turn": unstopped}
    if not convs:
        return Check("behaviour", "failed", "no chat eval rows to generate from", figures)
    if empty or unstopped:
        return Check(
            "behaviour",
            "failed",
            f"{empty} empty and {unstopped} without end-of-turn within "
            f"{recipe.gate.max_new_tokens} tokens, of {len(convs)} generations",
            figures,
        )
    return Check("behaviour", "passed", f"{len(convs)} generations non-empty and stopped at end-of-turn", figures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serving(loaded: Loaded, c: Candidate, *, timeout_s: float = 120.0) -> Check:
    """Start the real inference server with the adapter; one chat completion via the OpenAI client."""
    import httpx

    port = _free_port()
    env = dict(os.environ, LLAMA_TRAIN_API_KEY="gate-smoke-key")
    cmd = [
        sys.executable,
        "-m",
        "llama_train.serve",
        "--base",
        loaded.base_path,
        "--adapter",
        f"candidate={c.adapter_dir}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return Check("serving", "failed", f"server exited with {proc.returncode}: {proc.stdout.read()[-400:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            return Check("serving", "failed", f"server not ready within {timeout_s:.0f}s")
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="gate-smoke-key", max_retries=0, timeout=60)
        models = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model="candidate", max_tokens=16, temperature=0, messages=[{"role": "user", "content": "Sort: 321"}]
        )
        text = reply.choices[0].message.content or ""
        if "candidate" not in models or not text.strip():
            return Check("serving", "failed", f"models {models}; reply {text!r}")
        return Check(
            "serving",
            "passed",
            f"server answered as `candidate`: {text.strip()[:40]!r}",
            {"models": models, "completion_tokens": reply.usage.completion_tokens},
        )
    except Exception as exc:
        return Check("serving", "failed", f"OpenAI client call failed: {_first_line(exc)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------
# Orchestration


def _champion(recipe: Recipe, c: Candidate, tracking_uri: str | None) -> tuple[str | None, Path | None]:
    """(version, local dir) of the registry's current champion, unless it is the candidate itself."""
    name = c.registry_name or recipe.tracking.registered_model_name
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
        champ_version, champ_dir = _champion(recipe, c, tracking_uri)
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
        experiment=resolve_experiment(recipe),
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
        exp_id = ensure_experiment(client, resolve_experiment(recipe), uri=tracking_uri)
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
        print(f"warning: gate report not logged to MLflow ({tracking_uri}): {_first_line(exc)}", file=sys.stderr)
