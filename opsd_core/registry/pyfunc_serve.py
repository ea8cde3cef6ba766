"""What a registered version does once MLflow has loaded it: load the candidate on its base, answer problems
greedily with the student's prompt. Imported by ``pyfunc_model.OpsdModel`` at load time only (see there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.models.sources import load_candidate


def load(config: dict[str, Any], candidate: Path) -> tuple[torch.nn.Module, Any]:
    """The candidate on its base (the path it had at training time, else its spec: a hub id), in eval mode."""
    base = str(config.get("base_path") or "")
    if not base or not Path(base).exists():  # another machine: the spec it was trained from
        base = str(config["base_model"])
    model, tokenizer = load_candidate(base, candidate)
    model.eval()
    return model, tokenizer


def greedy_answers(model: torch.nn.Module, tokenizer: Any, problems: list[str], max_new_tokens: int,
                   thinking: bool | None) -> list[str]:
    """One greedy answer per problem, decoded without the prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    with torch.no_grad():
        for problem in problems:
            ids = torch.tensor([student_prompt_ids(tokenizer, problem, thinking)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers
