"""Dataset lineage for MLflow (`log_inputs`): one record per training source and one for the eval
data, each with a source (where the rows come from) and a digest (which rows).

Records are plain dicts (kept in tracking.json so `track sync` can log them later):
`{"name", "digest", "source_type", "source", "context", "profile"}`. The digest of a local file
is its sha256; of a hub dataset, the hash of id, split and revision; of the built-in tasks, the
hash of the generator settings. MLflow caps digests at 36 characters: they are cut to 16.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from llama_train.config import Recipe

BUILTIN = "builtin:tasks"
DIGEST_CHARS = 16
TRAIN, EVAL = "training", "evaluation"  # mlflow.data.context values the UI shows


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:DIGEST_CHARS]


def source_record(
    path: str,
    *,
    recipe: Recipe,
    context: str,
    split: str | None = None,
    revision: str | None = None,
    fmt: str | None = None,
) -> dict:
    """Name, source and digest of one data source (built-in, local file or hub id)."""
    if path == BUILTIN:
        b = recipe.data.builtin
        settings = {
            "tasks": b.tasks,
            "seed": b.seed,
            "num_rows": b.num_train if context == TRAIN else b.num_eval,
            "split": "train" if context == TRAIN else "eval",
        }
        return {
            "name": f"{BUILTIN}:{settings['split']}",
            "digest": _hash(settings),
            "source_type": "code",
            "source": json.dumps({"uri": BUILTIN, **settings}),
            "context": context,
        }
    local = Path(path)
    if local.is_file():
        resolved = local.resolve()
        return {
            "name": local.name,
            "digest": _file_digest(resolved),
            "source_type": "local",
            "source": json.dumps({"uri": resolved.as_uri()}),
            "context": context,
            **({"format": fmt} if fmt else {}),
        }
    hub = {"path": path, "split": split or "train", "revision": revision}
    return {
        "name": f"{path}:{hub['split']}",
        "digest": _hash(hub),
        "source_type": "hugging_face",
        "source": json.dumps({k: v for k, v in hub.items() if v is not None}),
        "context": context,
    }


def dataset_records(recipe: Recipe, *, fingerprint: str, num_train_rows: int, num_eval_rows: int) -> list[dict]:
    """Every training source, and the eval data (its file, the built-in eval split, or the held-out
    fraction of the training rows). The profile carries row counts and the tokenized data's
    fingerprint (`llama-train data check` and checkpoints use the same one)."""
    d = recipe.data
    records = []
    for src in d.sources:
        rec = source_record(
            src.path, recipe=recipe, context=TRAIN, split=src.split, revision=src.revision, fmt=src.format
        )
        rec["profile"] = json.dumps(
            {"weight": src.weight, "tokenized_train_rows": num_train_rows, "fingerprint": fingerprint}
        )
        records.append(rec)
    if num_eval_rows:
        if d.eval.path:
            rec = source_record(d.eval.path, recipe=recipe, context=EVAL)
        elif all(s.path == BUILTIN for s in d.sources):
            rec = source_record(BUILTIN, recipe=recipe, context=EVAL)
        else:  # held out from the training rows, seeded: the training sources and the fraction
            held = {"from": [r["digest"] for r in records], "fraction": d.eval.fraction, "seed": recipe.train.seed}
            rec = {
                "name": "held-out",
                "digest": _hash(held),
                "source_type": "code",
                "source": json.dumps({"uri": "held-out from the training sources", **held}),
                "context": EVAL,
            }
        rec["profile"] = json.dumps({"eval_rows": num_eval_rows})
        records.append(rec)
    for rec in records:
        rec.pop("format", None)
    return records


def log_dataset_records(client: MlflowClient, run_id: str, records: list[dict]) -> None:
    """`log_inputs` of the records (the server keeps one input per dataset: idempotent)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(
            Dataset(
                name=r["name"],
                digest=r["digest"],
                source_type=r["source_type"],
                source=r["source"],
                profile=r.get("profile"),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, r["context"])],
        )
        for r in records
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def examples_table(before: dict | None, after: dict | None, *, step: int) -> dict | None:
    """The eval examples (prompt, reference, prediction) before and after training as an MLflow
    table (pandas "split" orientation, what `MlflowClient.log_table` writes)."""
    rows = []
    for stage, at, ev in (("before", 0, before), ("after", step, after)):
        for ex in (ev or {}).get("examples", []):
            rows.append(
                [
                    stage,
                    at,
                    ex.get("prompt", ""),
                    ex.get("reference", ""),
                    ex.get("prediction", ""),
                    ex.get("prediction", "").strip() == ex.get("reference", "").strip(),
                ]
            )
    if not rows:
        return None
    return {"columns": ["stage", "step", "prompt", "reference", "prediction", "exact_match"], "data": rows}
