"""Alias moves under a lock, with an append-only audit trail.

MLflow keeps no alias history, so every move is written twice: a line in ``<state_dir>/audit.jsonl``
(the project's log, replayed by rollback) and the ``alias_history`` tag of the versions involved (so the
registry itself shows where an alias came from). Moves are serialised by an exclusive ``flock`` on
``<state_dir>/registry.lock``: callers hold it around read-current-champion -> gate -> move, so two
racing pipeline runs cannot both decide against the same stale champion. Pipelines with separate state
folders sharing one tracking server are serialised by the server-side promotion lease
(:mod:`opsd_core.registry.promotion_lease`): each move confirms it first, and its ticket number, which the
server hands out in order, is recorded with the move so the audit logs of several machines merge in order.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsd_core.layout import CHAMPION, Env
from opsd_core.registry.sqlite_read import sqlite_path
from opsd_core.registry.store import Store, all_versions, open_client, registry_lock, version_by_alias

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from opsd_core.registry.promotion_lease import PromotionLease

__all__ = ["audit_of", "champion_stack", "move_alias", "read_audit", "registry_audit", "registry_lock"]

AUDIT_FILE = "audit.jsonl"
HISTORY_TAG = "alias_history"
_HISTORY_KEEP = 200  # entries per version tag; the JSONL keeps everything


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    flow = os.environ.get(Env.FLOW_RUN)
    return f"{user}@{socket.gethostname()} pid={os.getpid()}" + (f" flow_run={flow}" if flow else "")


def read_audit(state_dir: Path, model: str | None = None) -> list[dict[str, Any]]:
    path = state_dir / AUDIT_FILE
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if model is None or e.get("model") == model]


def registry_audit(client: MlflowClient, model: str) -> list[dict[str, Any]]:
    """Every alias move of ``model`` as the registry itself records it (the versions' ``alias_history`` tags,
    each move once, in time order): the audit a machine sees when others share its tracking server, whose
    moves are not in its own ``audit.jsonl``. Each tag keeps its version's last moves only."""
    moves: dict[str, dict[str, Any]] = {}
    for mv in all_versions(client, model):
        try:
            history = json.loads(mv.tags.get(HISTORY_TAG, "[]"))
        except json.JSONDecodeError:
            continue
        for entry in history:  # a move is on both versions it involves
            moves[json.dumps(entry, sort_keys=True)] = entry
    return sorted(moves.values(), key=lambda e: (str(e.get("time", "")), e.get("lease_ticket") or 0))


def audit_of(store: Store, model: str, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """The audit that the gate, rollback and status read: this folder's log for a local SQLite store (whose
    moves all go through it); for a shared server, the registry's record of every machine's moves."""
    if sqlite_path(store.tracking_uri) is not None:
        return read_audit(store.state_dir, model)
    return registry_audit(client if client is not None else open_client(store), model)


def _append(state_dir: Path, entry: dict[str, Any]) -> None:
    with open(state_dir / AUDIT_FILE, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _tag_history(client: MlflowClient, name: str, version: str, entry: dict[str, Any]) -> None:
    mv = client.get_model_version(name, version)
    try:
        history = json.loads(mv.tags.get(HISTORY_TAG, "[]"))
    except json.JSONDecodeError:
        history = []
    history = [*history, entry][-_HISTORY_KEEP:]
    client.set_model_version_tag(name, version, HISTORY_TAG, json.dumps(history, sort_keys=True))


def move_alias(
    client: MlflowClient, state_dir: Path, name: str, alias: str, to_version: str | None, action: str,
    reason: str, run_id: str | None = None, lease: PromotionLease | None = None,
) -> dict[str, Any] | None:
    """Point ``alias`` at ``to_version`` (None: remove it) and record the move; None if nothing moved.

    Call with :func:`registry_lock` held, and ``lease`` (the server-side promotion lease) when other
    machines may move the same aliases: it is confirmed just before the alias is written.
    """
    current = version_by_alias(client, name, alias)
    from_version = str(current.version) if current is not None else None
    to_version = None if to_version is None else str(to_version)
    if from_version == to_version:
        return None
    if lease is not None:
        lease.confirm()
    if to_version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, to_version)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "model": name,
        "alias": alias,
        "from_version": from_version,
        "to_version": to_version,
        "action": action,
        "reason": reason,
        "actor": actor(),
        "run_id": run_id,
        "lease_ticket": lease.ticket if lease is not None else None,
    }
    _append(state_dir, entry)
    for version in {to_version, from_version} - {None}:
        _tag_history(client, name, version, entry)
    return entry


def champion_stack(entries: list[dict[str, Any]]) -> list[str]:
    """Replay champion moves into the stack of champions a rollback walks back through.

    A promotion pushes its version; a rollback (or the revert of a failed registration) pops the
    version it moved away from. Pure.
    """
    stack: list[str] = []
    for e in entries:
        if e.get("alias") != CHAMPION:
            continue
        if e.get("action") in ("rollback", "revert") and stack and stack[-1] == e.get("from_version"):
            stack.pop()
        to = e.get("to_version")
        if to is not None and (not stack or stack[-1] != to):
            stack.append(to)
    return stack


def unaudited_champion(entries: list[dict[str, Any]], current: str | None) -> str | None:
    """Why the registry's ``champion`` is not the one opsd's audit log ends at (an alias set by hand in the
    MLflow UI or API, past the gate), or None when they agree. Pure."""
    stack = champion_stack(entries)
    logged = stack[-1] if stack else None
    if current == logged:
        return None
    return (f"champion is {'v' + current if current else 'unset'} but opsd's audit log ends at "
            f"{'v' + logged if logged else 'no champion'}: the alias was moved outside opsd, past the gate")
