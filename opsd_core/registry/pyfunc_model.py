"""The registered version's model as MLflow loads it: problems in, the candidate's greedy answers out.

MLflow also runs this module when it saves a version (models from code: ``pyfunc_entry.py``), in the
``opsd register`` process, which needs neither torch nor transformers; the model itself (``pyfunc_serve``) is
imported when a version is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from opsd_core.registry.pyfunc import CANDIDATE


class OpsdModel(mlflow.pyfunc.PythonModel):
    """Problems in, the candidate's greedy answers out."""

    def load_context(self, context: Any) -> None:
        from opsd_core.registry import pyfunc_serve

        config = context.model_config or {}
        self.model, self.tokenizer = pyfunc_serve.load(config, Path(context.artifacts[CANDIDATE]))
        self.max_new_tokens = int(config.get("max_new_tokens", 256))
        self.thinking = config.get("thinking")

    # MLflow reads this hint at class definition: a DataFrame keeps SIGNATURE's "problem" column (a list[...]
    # hint would replace it with a bare list); a plain list of problems is accepted too
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from opsd_core.registry import pyfunc_serve  # loaded by load_context: a dictionary lookup here

        problems = list(model_input["problem"]) if hasattr(model_input, "columns") else list(model_input)
        return pyfunc_serve.greedy_answers(self.model, self.tokenizer, [str(p) for p in problems],
                                           self.max_new_tokens, self.thinking)
