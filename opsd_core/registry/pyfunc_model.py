"""The registered version's model as MLflow loads it: problems in, the candidate's greedy answers out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.models.sources import load_candidate
from opsd_core.registry.pyfunc import CANDIDATE


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
