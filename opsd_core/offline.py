"""The environment every opsd process runs with unless the user says otherwise: no hub downloads, no
telemetry, quiet progress bars. The CLI, the tests and the benchmarks all apply this one table."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # transformers' per-load "Loading weights" bars drown the training log; opsd's own bars stay
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def apply_offline_defaults(env: MutableMapping[str, str] | None = None) -> None:
    """Set every default that ``env`` (default: this process's environment) does not set already."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_DEFAULTS.items():
        target.setdefault(key, value)
