"""Preflight on a fixture with known bad rows: exact counts per category, policies honored,
thresholds turn the report into a failure (exit code 3); mixtures and eval splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llama_train.config import recipe_from_dict
from llama_train.data.dataset import check_data, load_data
from llama_train.errors import DataError

from ..conftest import tiny_recipe


def _msg(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD = [dict(_msg(f"Sort: {n}", "".join(sorted(str(n)))), id=f"good-{n}") for n in range(310, 326)]
LONG = _msg("Reverse: " + " ".join("abcdefgh" * 8), "x")
BAD_LINES = [
    '{"messages": [',  # invalid_json
    json.dumps({"id": "no-messages"}),  # missing_field
    json.dumps({"messages": "hello"}),  # wrong_type
    json.dumps(_msg("Add: 1 + 1", 2)),  # wrong_type (content not a string)
    json.dumps(_msg("Add: 1 + 2", "   ")),  # empty_response
    json.dumps({k: v for k, v in GOOD[0].items() if k != "id"}),  # duplicate of GOOD[0]
    json.dumps(LONG),  # overlength (seq_len 64)
    json.dumps({"messages": [{"role": "user", "content": "Add: 4 + 4"}]}),  # no_supervised
]
EXPECTED = {
    "invalid_json": 1,
    "missing_field": 1,
    "wrong_type": 2,
    "empty_response": 1,
    "malformed_tool_call": 0,
    "duplicate": 1,
    "template": 0,
    "overlength": 1,
    "no_supervised": 1,
}


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in GOOD[:8]] + BAD_LINES + [json.dumps(r) for r in GOOD[8:]]
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path, tiny_dir, path, **data):
    return recipe_from_dict(
        tiny_recipe(
            tmp_path, tiny_dir, data={"sources": [{"path": str(path), "format": "messages"}], "seq_len": 64, **data}
        )
    )


def test_exact_counts_per_category(tmp_path, tiny_dir, tiny_tokenizer, bad_file):
    data, report = check_data(_recipe(tmp_path, tiny_dir, bad_file, max_dropped_fraction=1.0), tiny_tokenizer)
    assert report["counts"] == EXPECTED
    assert report["rows"] == 24 and report["kept"] == 16 and report["dropped"] == 8 and report["ok"]
    assert report["examples"]["invalid_json"][0].startswith(f"{bad_file} line 9: invalid JSON")
    assert report["examples"]["overlength"][0].startswith(f"{bad_file} line 15:")
    assert len(data.train) == 16 and sorted(data.train["id"]) == sorted(r["id"] for r in GOOD)
    assert sum(b["count"] for b in report["length_histogram"]) == 16
    assert 0 < report["efficiency"] <= 1 and 0 < report["efficiency_if"]["packed"] <= 1


def test_threshold_fails_training_and_check_exits_3(tmp_path, tiny_dir, tiny_tokenizer, bad_file):
    recipe = _recipe(tmp_path, tiny_dir, bad_file)  # default max_dropped_fraction 0.01
    with pytest.raises(DataError, match="max_dropped_fraction"):
        load_data(recipe, tiny_tokenizer)
    from typer.testing import CliRunner

    from llama_train.data.cli import data_app

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = CliRunner().invoke(data_app, ["check", str(path), "--json"])
    assert isinstance(result.exception, DataError) and result.exception.exit_code == 3
    report = json.loads(result.stdout)
    assert report["counts"] == EXPECTED and not report["ok"]


def test_overlength_policies(tmp_path, tiny_dir, tiny_tokenizer, bad_file):
    _, report = check_data(
        _recipe(tmp_path, tiny_dir, bad_file, overlength="truncate", max_dropped_fraction=1.0), tiny_tokenizer
    )
    # Truncating the long prompt cuts its answer: the row is dropped as having nothing supervised.
    assert report["counts"]["overlength"] == 0 and report["truncated"] == 1
    assert report["counts"]["no_supervised"] == 2 and report["kept"] == 16
    assert any("truncated to seq_len 64" in e for e in report["examples"]["no_supervised"])
    long_answer = tmp_path / "long_answer.jsonl"
    long_answer.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(_msg("Echo", "a b " * 60)) + "\n")
    data, report = check_data(_recipe(tmp_path, tiny_dir, long_answer, overlength="truncate"), tiny_tokenizer)
    assert report["truncated"] == 1 and report["kept"] == 2 and report["dropped"] == 0
    assert report["tokens"]["max"] > 64 and max(len(r) for r in data.train["input_ids"]) == 64
    with pytest.raises(DataError, match=r"line 15 has \d+ tokens > data.seq_len=64"):
        check_data(_recipe(tmp_path, tiny_dir, bad_file, overlength="error", max_dropped_fraction=1.0), tiny_tokenizer)


def test_mixture_weights_and_eval_fraction(tmp_path, tiny_dir, tiny_tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    b.write_text("question,answer\n" + "".join(f"Add: {i} + 1,{i + 1}\n" for i in range(10)))
    recipe = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            data={
                "seq_len": 64,
                "sources": [
                    {"path": str(a), "format": "messages", "weight": 0.5},
                    {
                        "path": str(b),
                        "format": "completion",
                        "weight": 2,
                        "columns": {"prompt": "question", "completion": "answer"},
                    },
                ],
                "eval": {"fraction": 0.2},
            },
        )
    )
    data, report = check_data(recipe, tiny_tokenizer)
    held = report["eval_held_out"]
    assert held == 5 and len(data.eval_rows) == 5 and report["ok"]
    kept = {s["path"]: s["kept"] for s in report["sources"]}
    used = {s["path"]: s["used"] for s in report["sources"]}
    assert kept[str(a)] + kept[str(b)] == 26 - held
    assert used[str(a)] == round(kept[str(a)] * 0.5) and used[str(b)] == 2 * kept[str(b)]
    assert len(data.train) == used[str(a)] + used[str(b)]
    eval_ids = {r["id"] for r in data.eval_rows}
    assert not eval_ids & set(data.train["id"])  # held-out rows never train


def test_eval_file(tmp_path, tiny_dir, tiny_tokenizer, bad_file):
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"id": "e1", "q": "Sort: 21", "a": "12"}) + "\n")
    recipe = _recipe(
        tmp_path,
        tiny_dir,
        bad_file,
        max_dropped_fraction=1.0,
        eval={"path": str(ev), "format": "completion", "columns": {"prompt": "q", "completion": "a"}},
    )
    data, _ = check_data(recipe, tiny_tokenizer)
    assert data.eval_rows[0]["messages"][-1] == {"role": "assistant", "content": "12"}
    assert len(data.eval) == 1 and data.eval[0]["labels"][-3:] != [-100] * 3
    ev.write_text(json.dumps({"id": "e1", "q": "Sort: 21"}) + "\n")
    with pytest.raises(DataError, match="data.eval.path .* row 1: missing field `completion`"):
        check_data(recipe, tiny_tokenizer)


def test_missing_file_names_the_key(tmp_path, tiny_dir, tiny_tokenizer):
    with pytest.raises(DataError, match="data.sources path .*nope.jsonl does not exist"):
        check_data(_recipe(tmp_path, tiny_dir, tmp_path / "nope.jsonl"), tiny_tokenizer)


def test_chat_template_refusing_a_row_drops_that_row_and_a_syntax_error_names_the_key(
    tmp_path, tiny_dir, tiny_tokenizer
):
    from llama_train.errors import RecipeError
    from llama_train.model import load_tokenizer

    path = tmp_path / "train.jsonl"
    rows = [GOOD[0], _msg("BAD", "x"), *GOOD[1:8]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refusing = (
        "{% for m in messages %}{% if m['content'] == 'BAD' %}{{ raise_exception('roles must alternate') }}"
        "{% endif %}{% endfor %}" + tiny_tokenizer.chat_template
    )
    recipe = _recipe(tmp_path, tiny_dir, path, chat_template=refusing, max_dropped_fraction=0.5, cache=False)
    data, report = check_data(recipe, load_tokenizer(recipe, str(tiny_dir)))
    assert report["counts"]["template"] == 1 and report["kept"] == 8 and report["ok"]
    assert report["examples"]["template"] == [f"{path} line 2: the chat template refused it: roles must alternate"]
    broken = _recipe(tmp_path, tiny_dir, path, chat_template="{% if x %}")
    with pytest.raises(RecipeError, match=r"data.chat_template: Jinja syntax error at line 1"):
        load_tokenizer(broken, str(tiny_dir))


def test_no_usable_rows_is_a_data_error_with_the_cache_and_a_damaged_entry_is_rebuilt(
    tmp_path, tiny_dir, tiny_tokenizer
):
    from llama_train.data import cache

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = _recipe(tmp_path, tiny_dir, empty, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no usable training rows"):
        load_data(recipe, tiny_tokenizer)
    assert not list((tmp_path / "cache").glob("*/COMPLETE"))  # nothing cached for it

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    recipe = _recipe(tmp_path, tiny_dir, good, cache_dir=str(tmp_path / "cache"))
    _, info = cache.build_or_load(recipe, tiny_tokenizer)
    (Path(info["path"]) / "meta.json").write_text("{trunc")
    prepared, again = cache.build_or_load(recipe, tiny_tokenizer)
    assert again["path"] == info["path"] and not again["hit"] and len(prepared.train) == len(GOOD)
