"""Ingest: validate new trace files from the source folder, then add them to ``data/raw/``.

Files are content-addressed in ``data/raw/ingested/`` so ingesting the same bytes twice adds nothing.
A file without a single valid row is moved to ``<source>/rejected/`` with a reason file beside it;
accepted files move to ``<source>/processed/``. Row-level problems in an accepted file are kept and
reported by the prepare stage (``reports/rejected.jsonl``), so nothing is lost either way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from opsd_core.config import Params
from opsd_core.data import read_jsonl, validate_row
from opsd_core.io import file_hash


def validate_file(path: Path, root: Path) -> tuple[int, list[str]]:
    """(number of schema-valid rows, first problems found) of one JSONL file."""
    valid, problems = 0, []
    for line in read_jsonl(path, root):
        rejection = line.error
        if rejection is None:
            _, rejection = validate_row(line.value)
        if rejection is None:
            valid += 1
        elif len(problems) < 20:
            problems.append(f"{line.file}:{line.line}: {rejection.reason} ({rejection.field}): {rejection.message}")
    return valid, problems


def ingest(params: Params, root: Path) -> dict[str, Any]:
    source = root / params.flow.source_dir
    files = sorted(p for p in source.glob("*.jsonl") if p.is_file()) if source.is_dir() else []
    dest = root / params.data.raw_dir / "ingested"
    added, skipped, rejected = [], [], []
    for path in files:
        valid, problems = validate_file(path, root)
        if valid == 0:
            target = source / "rejected" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            reasons = "\n".join(problems) or "file holds no rows"
            target.with_suffix(".reason.txt").write_text(f"no valid trace rows:\n{reasons}\n")
            rejected.append({"file": path.name, "problems": problems[:5]})
            continue
        digest = file_hash(path, 12)
        out = dest / f"{path.stem}-{digest}.jsonl"
        # keyed on the content alone (``out`` included): the same bytes under another name are not added again
        if any(dest.glob(f"*-{digest}.jsonl")):
            skipped.append(path.name)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            # copied under a temporary name, then renamed: a crash mid-copy must not leave a truncated file
            # under the final name, which the next run would take for this content already ingested
            tmp = dest / f".{out.name}.{os.getpid()}.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, out)
            added.append({"file": path.name, "as": out.relative_to(root).as_posix(), "valid_rows": valid,
                          "row_problems": len(problems)})
        done = source / "processed" / path.name
        done.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, done)
    return {"added": added, "already_ingested": skipped, "rejected_files": rejected}
