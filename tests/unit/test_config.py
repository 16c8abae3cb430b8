"""Recipe schema: unknown keys with suggestions, wrong types, conflicts, overrides, every recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_train.config import dump_recipe, load_recipe, recipe_from_dict, recipe_schema
from llama_train.errors import RecipeError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
MIN = {"train": {"max_steps": 1}}


def _err(data) -> str:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data)
    return str(exc.value)


def test_unknown_key_names_full_path_and_suggests():
    msg = _err({"train": {"max_step": 5}})
    assert "train.max_step: unknown key" in msg
    assert "did you mean `train.max_steps`" in msg


def test_unknown_nested_key_in_list_item():
    msg = _err({**MIN, "data": {"sources": [{"pth": "x.jsonl"}]}})
    assert "data.sources.0.pth" in msg and "`data.sources.0.path`" in msg


def test_unknown_section_suggests_section():
    assert "did you mean `train`" in _err({"trian": {"max_steps": 1}})


def test_wrong_type_names_key_and_value():
    msg = _err({"train": {"max_steps": "ten"}})
    assert "train.max_steps" in msg and "'ten'" in msg


def test_literal_choices_listed():
    msg = _err({**MIN, "parallel": {"strategy": "horovod"}})
    assert "parallel.strategy" in msg and "fsdp" in msg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"train": {"max_steps": 5, "epochs": 1}}, "train.max_steps and train.epochs"),
        ({"train": {}}, "set train.max_steps or train.epochs"),
        ({"train": {"max_steps": 5, "warmup_steps": 1, "warmup_ratio": 0.1}}, "warmup"),
        ({**MIN, "model": {"source": "hf"}}, "model.path"),
        ({**MIN, "model": {"quantization": "nf4"}, "lora": {"enabled": False}}, "lora.enabled"),
    ],
)
def test_conflicts(data, needle):
    assert needle in _err(data)


def test_qlora_without_cuda_is_a_preflight_error():
    import torch

    from llama_train.errors import PreflightError
    from llama_train.preflight import preflight

    r = recipe_from_dict({**MIN, "model": {"quantization": "nf4"}})
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PreflightError, match="model.quantization"):
        preflight(r, world_size=1)


def test_overrides_are_typed_and_dotted(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 3\n")
    r = load_recipe(
        p,
        [
            "train.lr=1e-4",
            "lora.r=32",
            "lora.target_modules=[q_proj, v_proj]",
            "data.packing=true",
            "output_dir=/tmp/x",
        ],
    )
    assert r.train.lr == pytest.approx(1e-4) and r.lora.r == 32
    assert r.lora.target_modules == ["q_proj", "v_proj"] and r.data.packing is True
    assert r.output_dir == "/tmp/x"
    with pytest.raises(RecipeError, match="train.lrr: unknown key"):
        load_recipe(p, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(p, ["train.lr"])


def test_normalized_yaml_roundtrips_and_hash_is_stable(tmp_path):
    r = recipe_from_dict({"train": {"max_steps": 3}})
    p = tmp_path / "n.yaml"
    p.write_text(dump_recipe(r))
    again = load_recipe(p)
    assert again == r and again.sha256() == r.sha256()
    assert recipe_from_dict({"train": {"max_steps": 4}}).sha256() != r.sha256()


def test_schema_describes_every_field():
    schema = recipe_schema()
    missing = []

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{path}{name}")

    walk(schema, "")
    for name, d in schema.get("$defs", {}).items():
        walk(d, f"{name}.")
    assert not missing, missing


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_validates_and_starts_with_its_command(path):
    load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("llama-train" in first or "torchrun" in first), first


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "quickstart.yaml" in names and len(RECIPES) >= 7


def _cli(*args, cwd=ROOT):
    return run_cli(*args, cwd=cwd)


def test_cli_bad_path_and_malformed_yaml_exit_codes(tmp_path):
    res = _cli("recipe", "validate", str(tmp_path / "nope.yaml"))
    assert 1 <= res.returncode <= 127 and "recipe file not found" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    res = _cli("recipe", "validate", str(bad))
    assert 1 <= res.returncode <= 127 and "malformed YAML" in res.stderr and "line" in res.stderr
    res = _cli("run", str(bad))
    assert 1 <= res.returncode <= 127 and "malformed YAML" in res.stderr


def test_cli_validate_show_schema_list(tmp_path):
    res = _cli("recipe", "validate", "recipes/quickstart.yaml")
    assert res.returncode == 0 and "valid" in res.stdout and "memory per rank" in res.stdout
    res = _cli("recipe", "show", "recipes/quickstart.yaml", "train.lr=0.5")
    assert res.returncode == 0 and "lr: 0.5" in res.stdout and "keep_last_k" in res.stdout
    res = _cli("recipe", "schema")
    assert res.returncode == 0 and json.loads(res.stdout)["title"] == "llama_train recipe"
    res = _cli("recipe", "list")
    assert res.returncode == 0 and "recipes/quickstart.yaml\tllama-train run recipes/quickstart.yaml" in res.stdout
    res = _cli("recipe", "validate", "recipes/quickstart.yaml", "train.max_stepz=3")
    assert res.returncode == 2 and "did you mean `train.max_steps`" in res.stderr


def test_yaml_pitfalls_are_named(tmp_path):
    """A key given twice, an empty or non-UTF-8 file, non-finite numbers, betas out of range and
    YAML's bool reading of bare words are errors that say what to change; dates stay strings."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("train: {lr: 1.0e-4}\ntrain: {max_steps: 3}\n")
    with pytest.raises(RecipeError, match=r"line 2.*duplicate key 'train' \(also at line 1\)"):
        load_recipe(dup)
    merged = tmp_path / "merge.yaml"  # YAML merge keys are not duplicates
    merged.write_text(
        "train: {max_steps: 1}\ndata:\n  sources:\n    - &a {path: a.jsonl, format: messages}\n"
        "    - {<<: *a, path: b.jsonl}\n"
    )
    assert [s.path for s in load_recipe(merged).data.sources] == ["a.jsonl", "b.jsonl"]
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "latin1.yaml").write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="is not UTF-8"):
        load_recipe(tmp_path / "latin1.yaml")
    qs = ROOT / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError) as err:
        load_recipe(
            qs, ["train.lr=inf", "train.loss_scale_init=.nan", "train.betas=[1.5, 0.9]", "tracking.experiment=yes"]
        )
    msg = str(err.value)
    assert (
        "train.lr: Input should be a finite number" in msg and "train.loss_scale_init: Input should be a finite" in msg
    )
    assert "train.betas.0: Input should be less than 1" in msg
    assert (
        "tracking.experiment: Input should be a valid string (got True); YAML read the value as bool: quote it" in msg
    )
    assert load_recipe(qs, ["tracking.run_name=2024-01-01"]).tracking.run_name == "2024-01-01"
    with pytest.raises(RecipeError, match=r"override '=4': the key '' is not a dotted recipe key"):
        load_recipe(qs, ["=4"])
    with pytest.raises(RecipeError, match=r"unknown key \(YAML needs a space after ':'"):
        load_recipe(qs, ["data.sources=[{path: x.jsonl, format:messages}]"])


def test_init_tiny_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    from llama_train.cli import main

    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_text("precious")
    assert main(["init-tiny", str(other)]) == 2
    assert "is not empty and holds no tiny model" in capsys.readouterr().err
    assert (other / "model.safetensors").read_text() == "precious"


def test_paths_and_module_names_that_cannot_work_are_recipe_errors(tmp_path, tiny_dir):
    from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    hub = recipe_from_dict(tiny_recipe(tmp_path, model={"source": "hf", "path": "/nonexistent"}))
    with pytest.raises(RecipeError, match=r"cannot load model.path '/nonexistent'"):
        load_tokenizer(hub, "/nonexistent")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecipeError, match=r"output_dir .*afile is a file"):
        train(recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, output_dir=str(tmp_path / "afile"))))
    bogus = recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, lora={"modules_to_save": ["bogus"]}))
    with pytest.raises(RecipeError, match=r"lora.modules_to_save \['bogus'\]: no module"):
        apply_finetuning(load_base_model(bogus.model, str(tiny_dir)), bogus)


def test_run_rejects_bad_launch_flags_before_torchrun(capsys):
    """torchrun answers these with an AssertionError and exit 130 (retried as infrastructure)."""
    from llama_train.launch import launch

    quick = str(ROOT / "recipes" / "quickstart.yaml")
    for kw, flag in [
        ({"nproc_per_node": 0}, "--nproc-per-node 0"),
        ({"nnodes": -1}, "--nnodes -1"),
        ({"nnodes": 2, "node_rank": 2}, "--node-rank 2"),
        ({"master_port": 70000}, "--master-port"),
    ]:
        assert launch(quick, [], **kw) == 2, kw
        assert flag in capsys.readouterr().err
    # A worker node whose master never comes up fails with the address (torchrun would wait 10 minutes).
    from tests.integration.test_distributed import free_port

    port = free_port()
    code = launch(quick, ["parallel.strategy=ddp", "parallel.timeout_s=10"], nnodes=2, node_rank=1, master_port=port)
    assert (
        code == 130 and f"node rank 1 cannot reach the master at 127.0.0.1:{port} after 10 s" in capsys.readouterr().err
    )


def test_recipe_schema_output_path_errors(tmp_path):
    from typer.testing import CliRunner

    from llama_train.cli import app
    from llama_train.errors import UsageError

    res = CliRunner().invoke(app, ["recipe", "schema", "-o", str(tmp_path)])
    assert isinstance(res.exception, UsageError) and "is a directory" in str(res.exception)
    nested = tmp_path / "new" / "x.json"  # parent directories are created
    assert CliRunner().invoke(app, ["recipe", "schema", "-o", str(nested)]).exit_code == 0
    assert json.loads(nested.read_text())["title"]


def test_validate_cluster_checks_the_cluster_not_this_machine(capsys):
    """`recipe validate --cluster`: a CUDA-only recipe validates on a laptop (the world size comes
    from the recipe's k8s section), and a cluster shape that cannot work is still refused."""
    import torch

    from llama_train.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to show the difference")
    qlora = str(ROOT / "recipes/llama3.1/8b_qlora.yaml")
    assert main(["recipe", "validate", qlora]) == 4
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["recipe", "validate", qlora, "--cluster"]) == 0
    assert "devices and packages not checked (--cluster)" in capsys.readouterr().out
    big = str(ROOT / "recipes/llama3.1/70b_lora.yaml")
    assert main(["recipe", "validate", big, "--cluster"]) == 0
    assert "fsdp on 16 rank(s)" in capsys.readouterr().out  # k8s.nodes 2 x gpus_per_node 8
    assert main(["recipe", "validate", big, "train.global_batch_size=64", "--cluster"]) == 0
    capsys.readouterr()
    assert main(["recipe", "validate", big, "train.global_batch_size=64", "k8s.nodes=3", "--cluster"]) == 4
    assert "world size (24)" in capsys.readouterr().err
