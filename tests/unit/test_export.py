"""Export: adapter / merged / vLLM / NIM layouts, manifest, lint gate, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shlex

import pytest
import torch
import yaml

from llama_train.errors import ExportError
from llama_train.export import export_run

PROMPT_IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits


def make_adapter(base_dir, out, *, seed=1, **lora_kw):
    """Save a random (non-zero) LoRA on the tiny model; return the in-memory PeftModel's logits."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(
        r=lora_kw.pop("r", 8),
        lora_alpha=16,
        init_lora_weights=False,
        target_modules=lora_kw.pop("target_modules", ["q_proj", "v_proj", "down_proj"]),
        **lora_kw,
    )
    model = peft.get_peft_model(model, cfg).eval()
    model.save_pretrained(out)  # writes README.md too: export must strip it
    return _logits(model)


def make_run(tmp_path, base_dir, *, recipe_export=None, **lora_kw):
    run = tmp_path / "run"
    logits = make_adapter(base_dir, run / "adapter", **lora_kw)
    recipe = {
        "output_dir": str(run),
        "export": {
            "targets": ["vllm", "nim"],
            "max_lora_rank": 16,
            "allow_incompatible": False,
            **(recipe_export or {}),
        },
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "run.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "global_step": 20,
                "train_loss": 1.25,
                "eval": {"before": {"loss": 3.0, "exact_match": 0.0}, "after": {"loss": 1.1, "exact_match": 0.5}},
                "adapter_dir": str(run / "adapter"),
                "base_model": str(base_dir),
                "recipe_sha256": "ab" * 32,
                "run_name": "tiny-sql",
            }
        )
    )
    return run, logits


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export_run"), tiny_dir)


def test_adapter_export_is_two_files_and_reproduces_logits(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, source_logits = run_dir
    assert (run / "adapter" / "README.md").exists()
    manifest = export_run(run, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    torch.testing.assert_close(_logits(loaded), source_logits, rtol=0, atol=0)


def test_merged_equals_base_plus_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, source_logits = run_dir
    export_run(run, tmp_path / "out", formats=["merged"])
    merged_dir = tmp_path / "out" / "merged"
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), source_logits, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template


def test_vllm_and_nim_layouts(run_dir, tmp_path, tiny_dir):
    run, _ = run_dir
    out = tmp_path / "out"
    export_run(run, out, formats=["vllm", "nim"])
    spec = json.loads((out / "vllm" / "lora_modules.json").read_text())
    module = spec["lora_modules"][0]
    assert module == {
        "name": "tiny-sql",
        "path": str((out / "vllm" / "tiny-sql").resolve()),
        "base_model_name": str(tiny_dir),
    }
    assert spec["max_lora_rank"] == 8  # smallest vLLM value >= r=8
    argv = shlex.split((out / "vllm" / "serve_command.txt").read_text())
    assert argv[:3] == ["vllm", "serve", str(tiny_dir)]
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert json.loads(argv[argv.index("--lora-modules") + 1]) == module
    for d in (out / "vllm" / "tiny-sql", out / "nim" / "tiny-sql"):
        assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_manifest_hashes_every_file_and_records_the_run(run_dir, tmp_path, tiny_dir):
    run, _ = run_dir
    out = tmp_path / "out"
    manifest = export_run(run, out, formats=["adapter", "nim"], adapter_name="sql-v1")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, sha in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha
    assert manifest["base_model"] == str(tiny_dir)
    assert manifest["recipe_sha256"] == "ab" * 32
    assert manifest["metrics"]["eval"]["after"]["exact_match"] == 0.5
    assert manifest["metrics"]["global_step"] == 20 and manifest["metrics"]["train_loss"] == 1.25
    assert manifest["formats"] == ["adapter", "nim"] and manifest["adapter_name"] == "sql-v1"
    assert manifest["llama_train_version"] and manifest["lint"] == []
    assert (out / "nim" / "sql-v1" / "adapter_config.json").exists()


def test_checkpoint_dir_finds_run_metadata_upwards(run_dir, tmp_path):
    import shutil

    run, _ = run_dir
    ckpt = tmp_path / "run2" / "checkpoints" / "step_5"
    shutil.copytree(run / "adapter", ckpt / "adapter")
    shutil.copy(run / "run.json", tmp_path / "run2" / "run.json")
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "eval_before": {"loss": 3.0, "examples": []}}))
    manifest = export_run(ckpt, tmp_path / "out")
    assert manifest["source"].endswith("step_5") and manifest["run_name"] == "tiny-sql"
    # the checkpoint's step, not run.json's final step/loss/eval (those describe other weights)
    assert manifest["metrics"] == {
        "status": "checkpoint",
        "global_step": 5,
        "train_loss": None,
        "eval": {"before": {"loss": 3.0}},
    }


def test_incompatible_adapter_fails_unless_allowed(tiny_dir, tmp_path):
    run, _ = make_run(tmp_path, tiny_dir, r=32)
    with pytest.raises(ExportError) as exc:
        export_run(run, tmp_path / "out")
    msg = str(exc.value)
    assert "not servable by ['vllm', 'nim']" in msg and "--max-lora-rank 32" in msg
    assert "--allow-incompatible" in msg and exc.value.exit_code == 7
    assert not (tmp_path / "out").exists()
    manifest = export_run(run, tmp_path / "out", allow_incompatible=True)
    assert {f["rule"] for f in manifest["lint"]} == {"max_lora_rank"}
    assert export_run(run, tmp_path / "out2", targets=["nim"])["lint"][0]["severity"] == "warning"


def test_recipe_can_opt_out_of_the_lint(tiny_dir, tmp_path):
    run, _ = make_run(tmp_path, tiny_dir, use_dora=True, recipe_export={"allow_incompatible": True})
    manifest = export_run(run, tmp_path / "out")
    assert "no_dora" in {f["rule"] for f in manifest["lint"]}


def test_bad_inputs_are_clear_errors(run_dir, tmp_path):
    run, _ = run_dir
    # exit 7 is only for lint refusals: bad flags are usage (2), missing inputs other errors (1)
    with pytest.raises(ExportError, match="not a directory") as exc:
        export_run(tmp_path / "missing", tmp_path / "out")
    assert exc.value.exit_code == 1
    with pytest.raises(ExportError, match="unknown export format") as exc:
        export_run(run, tmp_path / "out", formats=["gguf"])
    assert exc.value.exit_code == 2 and "--format" in str(exc.value)
    with pytest.raises(ExportError, match="unknown serving target") as exc:
        export_run(run, tmp_path / "out", targets=["onnx"])
    assert exc.value.exit_code == 2 and "--target" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no adapter") as exc:
        export_run(tmp_path / "empty", tmp_path / "out")
    assert exc.value.exit_code == 1
    with pytest.raises(ExportError, match="adapter name"):
        export_run(run, tmp_path / "out", adapter_name="bad name/..")
    assert not (tmp_path / "out").exists()


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_existing_export_is_refused_then_replaced_whole_with_force(run_dir, tmp_path):
    run, _ = run_dir
    out = tmp_path / "out"
    export_run(run, out, formats=["adapter", "vllm"])
    before = _tree(out)
    with pytest.raises(ExportError, match="--force") as exc:
        export_run(run, out, formats=["adapter"])
    assert exc.value.exit_code == 2 and _tree(out) == before
    manifest = export_run(run, out, formats=["adapter"], force=True)
    # no stale vllm/ from the first export: the directory holds exactly what the manifest lists
    assert set(_tree(out)) == {"manifest.json", *manifest["files"]} and not (out / "vllm").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # as mkdir makes it (a temp dir would be 0700)


def test_failed_export_leaves_the_existing_export_untouched(run_dir, tmp_path):
    import shutil

    run, _ = run_dir
    out = tmp_path / "out"
    export_run(run, out, formats=["adapter"])
    before = _tree(out)
    broken = tmp_path / "broken"
    shutil.copytree(run / "adapter", broken / "adapter")
    (broken / "run.json").write_text(json.dumps({"base_model": str(tmp_path / "no-such-base")}))
    with pytest.raises(ExportError, match="needs the base model") as exc:
        export_run(broken, out, formats=["merged"], force=True)
    assert exc.value.exit_code == 1 and "--format adapter" in str(exc.value)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_out_over_the_source_or_a_file_and_unreadable_inputs_are_clear_errors(run_dir, tmp_path):
    import shutil

    run, _ = run_dir
    before = _tree(run)
    for out, needle in [
        (run, "is the source"),
        (run / "adapter", "inside the source"),
        (run.parent, "parent of the source"),
    ]:
        with pytest.raises(ExportError, match=needle) as exc:
            export_run(run, out, force=True)
        assert exc.value.exit_code == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="existing file"):
        export_run(run, tmp_path / "file")
    assert _tree(run) == before
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "run.json").write_text((run / "run.json").read_text()[:40])  # truncated
    with pytest.raises(ExportError, match="run.json is unreadable") as exc:
        export_run(bad, tmp_path / "o1")
    assert exc.value.exit_code == 1
    (bad / "run.json").write_bytes((run / "run.json").read_bytes())
    weights = bad / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ExportError, match="cannot be read as safetensors") as exc:
        export_run(bad, tmp_path / "o2", allow_incompatible=True)
    assert exc.value.exit_code == 1 and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_full_finetune_run_exports_merged_only(tiny_dir, tmp_path):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(tiny_dir, run / "model")
    (run / "run.json").write_text(json.dumps({"status": "completed", "base_model": str(tiny_dir)}))
    with pytest.raises(ExportError, match="full fine-tuning run"):
        export_run(run, tmp_path / "out", formats=["adapter"])
    manifest = export_run(run, tmp_path / "out", formats=["merged"])
    assert "merged/model.safetensors" in manifest["files"]


def test_export_command_via_typer(run_dir, tmp_path):
    from typer.testing import CliRunner

    from llama_train.cli import app

    run, _ = run_dir
    result = CliRunner().invoke(
        app, ["export", str(run), "--out", str(tmp_path / "o"), "--format", "adapter,vllm", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["formats"] == ["adapter", "vllm"]
