"""``opsd prepare``: validate, verify, deduplicate, decontaminate and split the raw traces.

The tokenizer of ``model.base`` only counts tokens for the length limits; the data work itself is
:func:`opsd_core.data.prepare_data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opsd_core.config import Params


def prepare(params: Params, root: Path) -> dict[str, Any]:
    """Write ``data/prepared/{train,val}.jsonl`` and the reports; returns the summary."""
    from opsd_core.data import prepare_data
    from opsd_core.models.sources import load_tokenizer

    tokenizer = load_tokenizer(params.model, root)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    summary = prepare_data(params.data, root, count_tokens, root / params.train.reports_dir)
    return summary if isinstance(summary, dict) else vars(summary)
