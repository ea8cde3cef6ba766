"""A registered candidate as an MLflow model (the pyfunc flavor), so MLflow's own loader serves it:
``mlflow.pyfunc.load_model("models:/opsd-model@champion").predict(["What is 2 + 3?"])`` answers with the
student's prompt, greedily.

The version's folder holds the candidate as trained (a peft adapter, or full weights) under
``artifacts/candidate`` and names its base model; the base itself is not copied into every version: it is
loaded from the path it had at training time when that exists, else from its spec (a hub id).

Saving needs neither torch nor transformers: the model is code (``pyfunc_entry.py``, ``pyfunc_model.py``) that
MLflow runs at save time too, and only loading a version imports the model (``pyfunc_serve.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

CANDIDATE = "candidate"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "problem")]), outputs=Schema([ColSpec("string")]))


def save(path: Path, candidate_dir: Path, meta: dict[str, Any], max_new_tokens: int, thinking: bool | None) -> None:
    """Write the MLflow model folder for ``candidate_dir`` at ``path`` (which must not exist)."""
    with warnings.catch_warnings():
        # an input example would make MLflow load the model and run it at save time; SIGNATURE says the input
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            # the model from code (a file MLflow copies and runs at load), not a pickled object
            str(path), python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={CANDIDATE: str(candidate_dir)}, signature=SIGNATURE,
            model_config={"base_model": str(meta["base_model"]), "base_path": str(meta.get("base_path") or ""),
                          "max_new_tokens": max_new_tokens, "thinking": thinking},
            # what loading needs is opsd itself (it brings torch, transformers and peft); no inference from imports
            pip_requirements=["opsd"],
        )
