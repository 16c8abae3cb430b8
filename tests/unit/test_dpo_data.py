"""Preference data (train.objective: dpo): preflight counts of bad pairs, column mapping, the pair
row layout, recipe errors for settings that conflict with DPO."""

from __future__ import annotations

import json

import pytest

from llama_train.config import recipe_from_dict
from llama_train.data.chat import IGNORE_INDEX
from llama_train.data.dataset import check_data
from llama_train.data.formats import RowError
from llama_train.errors import RecipeError
from tests.conftest import tiny_recipe


def _pair(i: int) -> dict:
    return {
        "id": f"p{i}",
        "prompt": [{"role": "user", "content": f"Add: {i} + {i}"}],
        "chosen": [{"role": "assistant", "content": str(2 * i)}],
        "rejected": [{"role": "assistant", "content": str(2 * i + 1)}],
    }


GOOD = [_pair(i) for i in range(12)]
BAD_LINES = [
    '{"prompt": [{"role": "user", "content": "Add: 1 + 1"}], ',  # invalid_json
    json.dumps({"prompt": "Add: 2 + 2", "chosen": "4"}),  # missing_field (rejected)
    json.dumps({"chosen": "4", "rejected": "5"}),  # missing_field (prompt)
    json.dumps({"prompt": "Add: 2 + 2", "chosen": 4, "rejected": "5"}),  # wrong_type
    json.dumps(
        {"prompt": [{"role": "user", "content": "Add: 3 + 3"}], "chosen": "6", "rejected": "7"}
    ),  # wrong_type (mixed)
    json.dumps({"prompt": "Add: 3 + 3", "chosen": "  ", "rejected": "7"}),  # empty_response
    json.dumps(dict(_pair(40), rejected=[{"role": "assistant", "content": ""}])),  # empty_response
    json.dumps(dict(_pair(41), rejected=_pair(41)["chosen"])),  # identical_pair
    json.dumps({k: v for k, v in GOOD[0].items() if k != "id"}),  # duplicate of GOOD[0]
    json.dumps(dict(_pair(42), chosen=[{"role": "assistant", "content": " ".join(["9 8 7 6"] * 30)}])),  # overlength
]
EXPECTED = {
    "invalid_json": 1,
    "missing_field": 2,
    "wrong_type": 2,
    "empty_response": 2,
    "malformed_tool_call": 0,
    "duplicate": 1,
    "template": 0,
    "overlength": 1,
    "no_supervised": 0,
    "identical_pair": 1,
}


def _recipe(tmp_path, tiny_dir, path, *, columns=None, **data):
    return recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            train={"objective": "dpo"},
            data={
                "sources": [{"path": str(path), "format": "preference", "columns": columns or {}}],
                "seq_len": 96,
                **data,
            },
        )
    )


def test_exact_counts_for_bad_pairs(tmp_path, tiny_dir, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in GOOD[:6]] + BAD_LINES + [json.dumps(r) for r in GOOD[6:]]) + "\n")
    data, report = check_data(_recipe(tmp_path, tiny_dir, path, max_dropped_fraction=1.0), tiny_tokenizer)
    assert report["counts"] == EXPECTED, report["examples"]
    assert report["rows"] == 22 and report["kept"] == 12 and report["dropped"] == 10 and report["ok"]
    assert report["examples"]["identical_pair"][0].startswith(f"{path} line 14:")
    assert "prompt + chosen, prompt + rejected" in report["examples"]["overlength"][0]
    assert sorted(data.train["id"]) == sorted(r["id"] for r in GOOD)
    # the default threshold (1%) fails the data, naming the key
    _, strict = check_data(_recipe(tmp_path, tiny_dir, path), tiny_tokenizer)
    assert not strict["ok"] and "data.max_dropped_fraction" in strict["failures"][0]


def test_pair_row_layout_and_column_mapping(tmp_path, tiny_dir, tiny_tokenizer):
    """Columns renamed; a row = prompt+chosen then prompt+rejected, loss on the completions only."""
    path = tmp_path / "mapped.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": r["id"], "question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
            for r in GOOD
        )
    )
    data, report = check_data(
        _recipe(tmp_path, tiny_dir, path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}),
        tiny_tokenizer,
    )
    assert report["kept"] == 12 and report["ok"]
    row = data.train[0]
    a, b = row["doc_lens"]
    assert a + b == len(row["input_ids"]) == len(row["labels"])
    chosen, rejected = row["input_ids"][:a], row["input_ids"][a:]
    n_prompt = next(i for i, x in enumerate(row["labels"]) if x != IGNORE_INDEX)
    assert chosen[:n_prompt] == rejected[:n_prompt]  # the shared prompt
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][a : a + n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:a] == chosen[n_prompt:] and row["labels"][a + n_prompt :] == rejected[n_prompt:]
    text = tiny_tokenizer.decode(chosen[n_prompt:])
    pair = next(r for r in GOOD if r["id"] == row["id"])
    assert pair["chosen"][0]["content"] in text


def test_packing_keeps_pairs_whole(tmp_path, tiny_dir, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    data, report = check_data(_recipe(tmp_path, tiny_dir, path, packing=True, seq_len=256), tiny_tokenizer)
    assert report["ok"] and len(data.train) < 12
    pairs = sum(len(r["ids"]) for r in data.train)
    assert pairs == 12 and all(len(r["doc_lens"]) == 2 * len(r["ids"]) for r in data.train)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lora": {"enabled": False}, "dpo": {"reference": "adapter_disabled"}}, "dpo.reference: frozen_copy"),
        ({"dpo": {"reference": "frozen_copy"}}, "dpo.reference: auto"),
        ({"data": {"overlength": "truncate"}}, "data.overlength: drop"),
        ({"data": {"train_on": "all"}}, "data.train_on"),
        ({"dpo": {"loss": "ipo", "label_smoothing": 0.1}}, "dpo.label_smoothing"),
        ({"gate": {"metric": "exact_match"}}, "gate.metric: preference_accuracy"),
        ({"lora": {"modules_to_save": ["lm_head"]}}, "lora.modules_to_save"),
        ({"data": {"sources": [{"path": "x.jsonl", "format": "messages"}]}}, "format: preference"),
        ({"data": {"sources": [{"path": "builtin:tasks"}]}}, "builtin:preferences"),
        ({"data": {"eval": {"format": "messages"}}}, "data.eval.format"),
        ({"dpo": {"beta": 0}}, "dpo.beta"),
        ({"dpo": {"label_smoothing": 0.5}}, "dpo.label_smoothing"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, override, message):
    base = tiny_recipe(
        tmp_path,
        train={"objective": "dpo"},
        data={"sources": [{"path": "builtin:preferences", "format": "preference"}]},
    )
    for key, value in override.items():
        base.setdefault(key, {}).update(value)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        recipe_from_dict(base)


@pytest.mark.parametrize(
    "parallel",
    [
        {"strategy": "single"},
        {"strategy": "ddp"},
        {"strategy": "fsdp"},
        {"strategy": "deepspeed", "zero_stage": 1},
        {"strategy": "deepspeed", "zero_stage": 2},
        {"strategy": "deepspeed", "zero_stage": 3},
    ],
)
def test_full_finetuning_dpo_is_accepted_under_every_strategy(tmp_path, parallel):
    """The frozen reference copy is placed like the policy by each strategy (parallel.prepare_reference:
    sharded under fsdp and ZeRO-3), so no strategy is refused for full fine-tuning DPO."""
    base = tiny_recipe(
        tmp_path,
        train={"objective": "dpo"},
        data={"sources": [{"path": "builtin:preferences", "format": "preference"}]},
        lora={"enabled": False},
        parallel=parallel,
    )
    recipe = recipe_from_dict(base)
    assert recipe.parallel.strategy == parallel["strategy"] and recipe.dpo.reference == "auto"


def test_sft_recipe_refuses_preference_data(tmp_path):
    with pytest.raises(RecipeError, match="train.objective: dpo"):
        recipe_from_dict(tiny_recipe(tmp_path, data={"sources": [{"path": "p.jsonl", "format": "preference"}]}))
    with pytest.raises(RecipeError, match="needs train.objective: dpo"):
        recipe_from_dict(tiny_recipe(tmp_path, gate={"metric": "preference_accuracy"}))
    with pytest.raises(RecipeError, match="dpo.loss is set but train.objective is `sft`"):
        recipe_from_dict(tiny_recipe(tmp_path, dpo={"loss": "ipo"}))
    ok = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            train={"objective": "dpo"},
            data={"sources": [{"path": "builtin:preferences", "format": "preference"}]},
        )
    )
    assert ok.dpo.beta == 0.1 and ok.dpo.loss == "sigmoid"


def test_conversations_without_an_explicit_prompt_share_their_prefix_as_the_prompt():
    """UltraFeedback-style rows: `chosen`/`rejected` are whole conversations, the prompt missing or
    a plain string beside them; the messages both sides share are the prompt."""
    from llama_train.data.preference import normalize_pair

    user = {"role": "user", "content": "2+2?"}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    want = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    assert normalize_pair({"chosen": [user, good], "rejected": [user, bad]}) == want
    assert normalize_pair({"prompt": "2+2?", "chosen": [user, good], "rejected": [user, bad]}) == want
    with pytest.raises(RowError, match="missing field `prompt`"):  # nothing shared: still an error
        normalize_pair({"chosen": [good], "rejected": [bad]})
