"""Training metrics into the pipeline's MLflow run while the training runs, so a user watches the curve in
MLflow's UI step by step (the flow opens that run and names it in ``$OPSD_MLFLOW_RUN_ID``). Outside the flow
there is no run yet: the register stage logs the whole curve from ``train_curve.csv`` instead.

A tracking server that fails mid-training costs the live view, never the training: the first failure is
reported once and logging stops; register logs the curve afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from opsd_core.config import Params
from opsd_core.layout import TRAIN_GROUP
from opsd_core.registry.store import open_client, resolve_store


class LiveMetrics:
    """A per-step callback: ``row`` (one line of the training curve, with its ``step``) into ``run_id``."""

    def __init__(self, params: Params, root: Path, run_id: str, log: Callable[[str], None]) -> None:
        from mlflow.entities import Metric

        self._metric, self.run_id, self.log = Metric, run_id, log
        self.client = open_client(resolve_store(params, root))
        self.failed = False

    def __call__(self, row: dict[str, float]) -> None:
        if self.failed:
            return
        now, step = int(time.time() * 1000), int(row["step"])
        metrics = [self._metric(f"{TRAIN_GROUP}{k}", float(v), now, step) for k, v in row.items() if k != "step"]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # noqa: BLE001 - the live view is optional; the training is not
            self.failed = True
            self.log(f"opsd train: warning: MLflow stopped taking the live training metrics ({str(err)[:160]}); "
                     "register logs the whole curve after training")
