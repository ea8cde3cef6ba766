"""The stage contract: where a project keeps what the stages hand each other, and the names they share.

The files DVC passes between stages are opsd's real API (``dvc.yaml`` lists them as deps and outs), so their
names live here once: stages, flows, tests and benchmarks take them from :class:`Layout`, the registry's alias
names from :data:`CHAMPION`/:data:`CHALLENGER`, and the environment variables the flow hands to the stages
from :class:`Env`. ``tests/test_layout.py`` checks ``dvc.yaml`` against this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opsd_core.config import Params

CHAMPION = "champion"  # the model in production; moved only by the gate (or a rollback), with an audit line
CHALLENGER = "challenger"  # the latest registered candidate, promoted or not
ALIASES = (CHAMPION, CHALLENGER)

# MLflow metric key prefixes, one chart group each on a run's page. MLflow groups charts by the prefix before the
# last "/" and sorts the groups by name (3.17: localeCompare, prefix-less ones last), so these names put the
# training curves first (logged live by the training, or by register afterwards), then the gap the training
# started from, the training's summary, and the comparison with the base
TRAIN_GROUP = "train/"
GAP_GROUP = "train_gap/"
SUMMARY_GROUP = "train_summary/"
VS_BASE_GROUP = "vs_base/"

# file names inside the reports folder (params.train.reports_dir)
DATA_REPORT = "data.json"
REJECTED = "rejected.jsonl"
TRAIN_REPORT = "train.json"
TRAIN_CURVE = "train_curve.csv"
DIAGNOSIS_REPORT = "diagnosis.json"
EVAL_BASE_REPORT = "eval_base.json"
EVAL_REPORT = "eval.json"
PLOTS_DIR = "plots"  # PNGs drawn by the stages: what `dvc plots show` renders, offline
TRAINING_PLOT = "training_curve.png"
EVAL_PLOT = "eval.png"
REGISTRY_REPORT = "registry.json"
METRICS_DIR = "metrics"  # numbers only, one file per stage: what `dvc metrics show` tabulates
# inside the prepared-data and eval-data folders
TRAIN_SPLIT = "train.jsonl"
VAL_SPLIT = "val.jsonl"
GSM8K_EVAL = "gsm8k100.jsonl"
# inside the candidate folder: what was trained, from what, its content hash
CANDIDATE_META = "opsd_candidate.json"


class Env:
    """Environment variables opsd reads. The flow sets the first two for the stages it runs."""

    FLOW_RUN = "OPSD_FLOW_RUN_ID"  # the Prefect flow run a stage belongs to (lineage)
    PIPELINE_RUN = "OPSD_MLFLOW_RUN_ID"  # the pipeline's MLflow run: register logs into it, the flow closes it
    CPU_ISA = "OPSD_CPU_ISA"  # simulate a lower x86 instruction-set level (avx2, avx512, ...)
    HIDE = "OPSD_HIDE"  # hide capabilities from the probe (bf16, packs, ...)
    LOCK_DIR = "OPSD_LOCK_DIR"  # where the machine-wide locks live
    DEBUG = "OPSD_DEBUG"  # tracebacks for every error
    LEASE_TTL = "OPSD_PROMOTION_LEASE_TTL_S"
    LEASE_WAIT = "OPSD_PROMOTION_LEASE_WAIT_S"


@dataclass(frozen=True)
class Layout:
    """A project's folders, from its params and root (relative settings are joined to the root)."""

    root: Path
    raw: Path
    reports: Path
    prepared: Path
    eval_data: Path
    candidate: Path
    state: Path

    @classmethod
    def of(cls, params: Params, root: Path) -> Layout:
        root = Path(root)
        return cls(root=root, raw=root / params.data.raw_dir, reports=root / params.train.reports_dir, prepared=root / params.data.prepared_dir,
                   eval_data=root / params.data.eval_dir, candidate=root / params.train.output_dir,
                   # an absolute state_dir (shared between checkouts) survives the join unchanged
                   state=(root / params.registry.state_dir).resolve())

    @property
    def raw_dvc(self) -> Path:
        """The ``.dvc`` file that versions the raw traces (``dvc add``), beside their folder."""
        return self.raw.parent / f"{self.raw.name}.dvc"

    @property
    def data_report(self) -> Path:
        return self.reports / DATA_REPORT

    @property
    def rejected(self) -> Path:
        return self.reports / REJECTED

    @property
    def train_report(self) -> Path:
        return self.reports / TRAIN_REPORT

    @property
    def train_curve(self) -> Path:
        return self.reports / TRAIN_CURVE

    @property
    def diagnosis_report(self) -> Path:
        return self.reports / DIAGNOSIS_REPORT

    @property
    def eval_base_report(self) -> Path:
        return self.reports / EVAL_BASE_REPORT

    @property
    def eval_report(self) -> Path:
        return self.reports / EVAL_REPORT

    @property
    def training_plot(self) -> Path:
        return self.reports / PLOTS_DIR / TRAINING_PLOT

    @property
    def eval_plot(self) -> Path:
        return self.reports / PLOTS_DIR / EVAL_PLOT

    @property
    def registry_report(self) -> Path:
        return self.reports / REGISTRY_REPORT

    def metrics(self, stage: str) -> Path:
        return self.reports / METRICS_DIR / f"{stage}.json"

    @property
    def train_split(self) -> Path:
        return self.prepared / TRAIN_SPLIT

    @property
    def val_split(self) -> Path:
        return self.prepared / VAL_SPLIT

    @property
    def gsm8k_eval(self) -> Path:
        return self.eval_data / GSM8K_EVAL

    @property
    def candidate_meta(self) -> Path:
        return self.candidate / CANDIDATE_META
