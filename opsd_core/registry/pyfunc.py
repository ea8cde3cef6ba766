"""A registered candidate as an MLflow model (the pyfunc flavor), so MLflow's own loader serves it:
``mlflow.pyfunc.load_model("models:/opsd-model@champion").predict(["What is 2 + 3?"])`` answers with the
student's prompt, greedily.

The version's folder holds the candidate as trained (a peft adapter, or full weights) under
``artifacts/candidate`` and names its base model; the base itself is not copied into every version: it is
loaded from the path it had at training time when that exists, else from its spec (a hub id).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.models.sources import load_candidate

CANDIDATE = "candidate"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "problem")]), outputs=Schema([ColSpec("string")]))


class OpsdModel(mlflow.pyfunc.PythonModel):
    """Problems in, the candidate's greedy answers out."""

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        base = str(config.get("base_path") or "")
        if not base or not Path(base).exists():  # another machine: the spec it was trained from (a hub id)
            base = str(config["base_model"])
        self.model, self.tokenizer = load_candidate(base, Path(context.artifacts[CANDIDATE]))
        self.model.eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 256))
        self.thinking = config.get("thinking")

    # MLflow reads this hint at class definition: a DataFrame keeps SIGNATURE's "problem" column (a list[...]
    # hint would replace it with a bare list); a plain list of problems is accepted too
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        problems = list(model_input["problem"]) if hasattr(model_input, "columns") else list(model_input)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        answers = []
        with torch.no_grad():
            for problem in problems:
                ids = torch.tensor([student_prompt_ids(self.tokenizer, str(problem), self.thinking)])
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.max_new_tokens, pad_token_id=pad)
                answers.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return answers


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
