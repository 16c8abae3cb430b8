"""The built-in `date` task (recipes/smollm2.yaml): deterministic, exact answers, disjoint splits."""

from __future__ import annotations

import datetime
import re

from llama_train.data.builtin import generate_splits

PROMPT = re.compile(r"^Rewrite the date ([A-Z][a-z]+) (\d{1,2}), (\d{4}) as YYYY-MM-DD\.$")


def test_date_rows_are_deterministic_exact_and_held_out():
    train, held_out = generate_splits(num_train=500, num_eval=50, seed=0, tasks=("date",))
    assert (train, held_out) == generate_splits(num_train=500, num_eval=50, seed=0, tasks=("date",))
    for row in train + held_out:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        month, day, year = PROMPT.match(user).groups()
        parsed = datetime.datetime.strptime(f"{month} {day} {year}", "%B %d %Y").date()
        assert answer == parsed.isoformat()  # YYYY-MM-DD, zero-padded
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(held_out)
    assert len(prompts(train)) == 500 and len(prompts(held_out)) == 50
    assert {r["task"] for r in train} == {"date"}
