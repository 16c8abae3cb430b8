"""The default local MLflow store (`mlruns.db` + `mlartifacts/` in one directory) after a move.

MLflow records absolute `file://` artifact locations in the database (experiments, runs, model
versions), so a store copied to another path or machine keeps pointing at the old one. `relocate`
rewrites the locations under the old `mlartifacts/` to the `mlartifacts/` beside the database,
in one transaction (a no-op when nothing moved); `llama-train track ui DIR` relocates, then starts
`mlflow ui` on it. Locations outside the old `mlartifacts/` (another store's, an object store's)
are left alone.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from llama_train.errors import UsageError

DB_NAME = "mlruns.db"
ARTIFACTS_DIR = "mlartifacts"
# (table, column, extra condition) that hold artifact locations in MLflow 3's SQL schema
LOCATION_COLUMNS = [
    ("experiments", "artifact_location", ""),
    ("runs", "artifact_uri", ""),
    ("model_versions", "source", ""),
    ("model_versions", "storage_location", ""),
    ("logged_models", "artifact_location", ""),
    ("trace_tags", "value", " AND key = 'mlflow.artifactLocation'"),
]


def _store_paths(directory: Path) -> tuple[Path, Path]:
    directory = Path(directory).expanduser().resolve()
    db = directory / DB_NAME if directory.is_dir() else directory
    if not db.is_file():
        raise UsageError(
            f"{db} does not exist: pass the directory that holds {DB_NAME} and {ARTIFACTS_DIR}/ "
            "(the parent of the recipe's output_dir, e.g. outputs/)"
        )
    return db, db.parent / ARTIFACTS_DIR


def _old_roots(conn: sqlite3.Connection, new_root: str, artifacts: Path) -> set[str]:
    """`file://…/mlartifacts` locations of experiments that are not the one beside the db and whose
    runs' directories were moved here (an experiment deliberately pointed at another store's
    `mlartifacts/` keeps its location)."""
    roots = set()
    for (location,) in conn.execute("SELECT artifact_location FROM experiments"):
        if location and location.startswith("file:") and location.rstrip("/").endswith("/" + ARTIFACTS_DIR):
            root = location.rstrip("/")
            if root == new_root:
                continue
            runs = [
                r
                for (r,) in conn.execute(
                    "SELECT run_uuid FROM runs WHERE substr(artifact_uri, 1, ?) = ?", (len(root) + 1, root + "/")
                )
            ]
            if not runs or any((artifacts / run).is_dir() for run in runs):
                roots.add(root)
    return roots


def relocate(directory: Path) -> dict:
    """Point the store's artifact locations at `<directory>/mlartifacts`. Returns what changed:
    {"db", "artifacts", "from": [old roots], "num_rows_updated"}."""
    db, artifacts = _store_paths(directory)
    if not artifacts.is_dir():
        raise UsageError(f"{artifacts} does not exist: move {ARTIFACTS_DIR}/ together with {db.name}")
    new_root = artifacts.as_uri()
    conn = sqlite3.connect(db)
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            raise UsageError(f"{db} is not an MLflow store (no experiments table)")
        old_roots = _old_roots(conn, new_root, artifacts)
        updated = 0
        with conn:  # one transaction: all locations move, or none
            for old in sorted(old_roots):
                for table, column, only in LOCATION_COLUMNS:
                    if table not in tables:
                        continue
                    cur = conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE ({column} = ? OR substr({column}, 1, ?) = ?){only}",
                        (new_root, len(old) + 1, old, len(old) + 1, old + "/"),
                    )
                    updated += cur.rowcount
    finally:
        conn.close()
    return {"db": str(db), "artifacts": str(artifacts), "from": sorted(old_roots), "num_rows_updated": updated}


def _path_of(uri: str) -> str:
    return unquote(urlparse(uri).path)


def relocation_message(result: dict) -> str:
    if result["from"]:
        moved = ", ".join(_path_of(r) for r in result["from"])
        return (
            f"{result['db']}: artifact locations moved from {moved} to {result['artifacts']} "
            f"({result['num_rows_updated']} rows)"
        )
    return f"{result['db']}: artifact locations already point at {result['artifacts']}"


def ui_argv(result: dict, *, host: str, port: int) -> list[str]:
    """`mlflow ui` on a relocated store (`relocate`'s result)."""
    mlflow = shutil.which("mlflow")
    if mlflow is None:
        raise UsageError("the mlflow CLI is not on PATH: pip install mlflow")
    # --artifacts-destination: what the UI server itself stores goes beside the db too (its default
    # is ./mlartifacts of whatever directory this runs in)
    return [
        mlflow,
        "ui",
        "--backend-store-uri",
        f"sqlite:///{result['db']}",
        "--artifacts-destination",
        result["artifacts"],
        "--host",
        host,
        "--port",
        str(port),
    ]
