"""Aliases and version tags read straight from the embedded MLflow SQLite store, without MLflow.

``opsd status`` asks two questions (which version does each alias name, and what are its tags); answering
them through ``MlflowClient`` costs ~1.2 s of import and ~0.7 s of store set-up (SQLAlchemy, the schema
check) on a 2-core machine, for two indexed lookups. On the embedded SQLite store, at a schema revision
this module was checked against, the same rows are read here through ``sqlite3`` in read-only mode, so
reading can never create, migrate or lock the store for writing. Anything else (another backend, a
schema this module does not know, MLflow workspaces in use) gets ``None`` from :func:`open_store`, and
the caller asks MLflow. tests/test_status.py compares every answer with MlflowClient's on a real store.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

# alembic revisions of MLflow's SQL schema whose tables below were read against MlflowClient (the pinned
# mlflow's head; tests/test_status.py fails when an upgrade moves the head, so the fast path is re-checked)
KNOWN_REVISIONS = frozenset({"dc11669786a5"})
# MLflow's default workspace: every row of a store that does not use workspaces
_WORKSPACE = "default"
# model versions MLflow deleted but keeps as redacted rows; its own lookups skip them
_DELETED_STAGE = "Deleted_Internal"


@dataclass(frozen=True)
class VersionRow:
    """What status reads of a model version: the fields of MLflow's ``ModelVersion`` it uses."""

    version: str
    run_id: str | None
    tags: dict[str, str]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory, as MLflow resolves it)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri == "sqlite:///:memory:":
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve()


def open_store(tracking_uri: str) -> sqlite3.Connection | None:
    """A read-only connection to the store when its rows can be read here; None: ask MLflow instead."""
    path = sqlite_path(tracking_uri)
    if path is None or not path.is_file():
        return None
    if os.environ.get("MLFLOW_WORKSPACE") or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None  # rows outside the default workspace: MLflow decides which ones a client sees
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:  # unreadable here (permissions, ...): MLflow says what is wrong
        return None
    try:
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        revision = None
    if revision is None or revision[0] not in KNOWN_REVISIONS:
        conn.close()
        return None
    return conn


def read_aliases(tracking_uri: str, name: str, aliases: tuple[str, ...]) -> dict[str, VersionRow | None] | None:
    """Each alias's version (None: not set), or None when the store is not one to read here or a read
    fails (a lock held past the timeout, ...): the caller asks MLflow, which reports it properly."""
    conn = open_store(tracking_uri)
    if conn is None:
        return None
    try:
        return {alias: version_by_alias(conn, name, alias) for alias in aliases}
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def version_by_alias(conn: sqlite3.Connection, name: str, alias: str) -> VersionRow | None:
    """The version ``alias`` names with its tags, or None (no such model or alias; a deleted version)."""
    found = conn.execute(
        "SELECT v.version, v.run_id FROM registered_model_aliases a JOIN model_versions v "
        "ON v.workspace = a.workspace AND v.name = a.name AND v.version = a.version "
        "WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != ?",
        (_WORKSPACE, name, alias, _DELETED_STAGE)).fetchone()
    if found is None:
        return None
    version, run_id = found
    tags = dict(conn.execute(
        "SELECT key, value FROM model_version_tags WHERE workspace = ? AND name = ? AND version = ?",
        (_WORKSPACE, name, version)).fetchall())
    return VersionRow(version=str(version), run_id=run_id, tags=tags)
