"""``opsd prepare``: validate, verify, deduplicate, decontaminate and split the raw traces.

The tokenizer of ``model.base`` only counts tokens for the length limits; the data work itself is
:func:`opsd_core.data.prepare_data`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from opsd_core.config import Params
from opsd_core.data import prepare_data
from opsd_core.io import write_metrics
from opsd_core.layout import Layout
from opsd_core.models.sources import load_tokenizer


def prepare(params: Params, root: Path) -> dict[str, Any]:
    """Write ``data/prepared/{train,val}.jsonl`` and the reports; returns the summary."""
    tokenizer = load_tokenizer(params.model, root)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    layout = Layout.of(params, root)
    summary = prepare_data(params.data, root, count_tokens, layout.reports)
    record = summary if isinstance(summary, dict) else vars(summary)
    # the few counts worth a column in `dvc metrics show`; the reasons and the rest are in reports/data.json
    metrics = {k: record[k] for k in ("read", "accepted", "rejected", "train", "val") if k in record}
    write_metrics(layout.reports, "data", metrics)
    if record.get("rejected"):
        print(f"opsd prepare: {record['rejected']} of {record['read']} rows rejected, each with its file, line and "
              f"reason: {layout.rejected}", file=sys.stderr)
    return record
