"""Ingest new trace files, then track them with DVC (``dvc add``) and push them, surviving interruptions.

Ingest moves each accepted file out of the source folder once it is copied into ``data/raw/``, so a run
that dies after the copy but before ``dvc add`` (or in the middle of ``dvc push``) would leave the next run
nothing new to ingest: the files would sit in ``data/raw/`` untracked or unpushed for good. A journal,
``<state>/ingest.pending``, closes that gap: it is written before the first file reaches ``data/raw/`` and
removed only after ``dvc add`` and ``dvc push`` both succeeded; a run that finds it redoes both. Both are
idempotent (DVC skips objects already in the cache or the remote, and moves each one into place by a
rename, so an interrupted transfer leaves no half object under its final name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flows.dvc import StageError, dvc, has_remote
from opsd_core.config import Params
from opsd_core.data import ingest as ingest_mod
from opsd_core.registry.store import state_dir

JOURNAL = "ingest.pending"


def journal_path(params: Params, root: Path) -> Path:
    return state_dir(params, root) / JOURNAL


def restore_raw(params: Params, root: Path) -> bool:
    """A clone that has the raw data's ``.dvc`` file but not the data (a worker's fresh clone of the project):
    ``dvc pull`` it from the remote. True if it pulled."""
    root = Path(root)
    raw = root / params.data.raw_dir
    if raw.exists() or not raw.with_name(raw.name + ".dvc").is_file():
        return False
    if not (has_remote(root) or params.flow.dvc_remote):
        raise StageError(f"{raw.with_name(raw.name + '.dvc')} names a data version this clone does not have, and no "
                         "DVC remote is configured to pull it from (dvc remote add -d ...)")
    remote = ["-r", params.flow.dvc_remote] if params.flow.dvc_remote else []
    dvc(["pull", *remote, f"{params.data.raw_dir}.dvc"], root)
    return True


def ingest_and_track(params: Params, root: Path) -> dict[str, Any]:
    """Ingest, ``dvc add`` the raw folder and push it when a remote is set; finishes an interrupted run's work."""
    root = Path(root)
    pulled = restore_raw(params, root)
    journal = journal_path(params, root)
    unfinished = journal.is_file()
    source = root / params.flow.source_dir
    if not unfinished and source.is_dir() and any(source.glob("*.jsonl")):
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    result = ingest_mod.ingest(params, root)
    if result["added"] or unfinished:
        dvc(["add", params.data.raw_dir], root)
        if has_remote(root) or params.flow.dvc_remote:
            remote = ["-r", params.flow.dvc_remote] if params.flow.dvc_remote else []
            dvc(["push", *remote, f"{params.data.raw_dir}.dvc"], root)
            result["pushed"] = True
    if unfinished:
        result["finished_interrupted_ingest"] = True
    if pulled:
        result["pulled"] = True
    journal.unlink(missing_ok=True)
    return result
