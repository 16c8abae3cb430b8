"""Built-in instruction data: small text tasks with exact answers that a tiny model can learn
(reverse, sort, add) and one for a real pretrained model (date: reformat a date as YYYY-MM-DD).

Generated deterministically from a seed, in OpenAI-style `messages` format. The eval split never
shares a prompt with the train split, so exact match on it measures generalization, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = ("reverse", "sort", "add")  # the default mix (the tiny model's tokenizer is trained on it)
ALL_TASKS = (*TASKS, "date")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _example(rng: random.Random, task: str) -> tuple[str, str]:
    if task == "reverse":
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        return "Reverse: " + " ".join(letters), " ".join(reversed(letters))
    if task == "sort":
        digits = [rng.choice("0123456789") for _ in range(rng.randint(3, 7))]
        return "Sort: " + "".join(digits), "".join(sorted(digits))
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"Add: {a} + {b}", str(a + b)
    if task == "date":
        # A format a pretrained chat model knows but does not answer in: the base model restates
        # the date in words, a short LoRA fine-tune learns the month numbers and the exact layout.
        year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        return f"Rewrite the date {MONTHS[month - 1]} {day}, {year} as YYYY-MM-DD.", f"{year}-{month:02d}-{day:02d}"
    raise ValueError(f"unknown built-in task {task!r}; choose from {ALL_TASKS}")


def generate_examples(*, num_examples: int, seed: int, tasks=TASKS, exclude: set[str] | None = None):
    """`num_examples` distinct examples cycling through `tasks`; prompts in `exclude` are skipped."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    attempts = 0
    while len(out) < num_examples:
        attempts += 1
        if attempts > 100 * num_examples:
            raise ValueError(f"cannot draw {num_examples} distinct built-in examples; lower the count")
        task = tasks[len(out) % len(tasks)]
        prompt, answer = _example(rng, task)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(
            {
                "id": f"{task}-{len(out)}",
                "task": task,
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return out


def generate_splits(*, num_train: int, num_eval: int, seed: int, tasks=TASKS):
    """Train and eval splits with disjoint prompts; eval is drawn first so it is stable when
    `num_train` changes."""
    eval_rows = generate_examples(num_examples=num_eval, seed=seed + 1_000_003, tasks=tasks)
    for row in eval_rows:
        row["id"] = "eval-" + row["id"]
    held_out = {r["messages"][0]["content"] for r in eval_rows}
    train_rows = generate_examples(num_examples=num_train, seed=seed, tasks=tasks, exclude=held_out)
    return train_rows, eval_rows


def write_jsonl(rows, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _rejected(task: str, prompt: str, answer: str) -> str:
    """A wrong answer the base model finds natural: the date restated in words (what a pretrained
    chat model answers), the letters or digits as given, or the sum off by one."""
    if task == "date":
        return prompt.removeprefix("Rewrite the date ").removesuffix(" as YYYY-MM-DD.")
    if task == "reverse":
        return prompt.removeprefix("Reverse: ")
    if task == "sort":
        return "".join(sorted(answer, reverse=True))
    return str(int(answer) + 1)


def to_preference(row: dict) -> dict | None:
    """A built-in example as a conversational preference pair (None when both sides coincide)."""
    prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    rejected = _rejected(row["task"], prompt, answer)
    if rejected == answer:
        return None
    return {
        "id": row["id"],
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def generate_preference_splits(*, num_train: int, num_eval: int, seed: int, tasks=TASKS):
    """`builtin:preferences`: the built-in tasks as {prompt, chosen, rejected} pairs whose chosen side
    is the exact answer in the required format; train and eval prompts are disjoint."""
    train, ev = generate_splits(num_train=num_train, num_eval=num_eval, seed=seed, tasks=tasks)
    return ([p for p in map(to_preference, train) if p], [p for p in map(to_preference, ev) if p])
