"""Prompt and scoring functions that the generated lm-eval task YAMLs reference with ``!function``.

They live in an importable module (not a ``utils.py`` copied beside each YAML) so that evaluation
scores answers with exactly the code the prepare stage uses to verify traces.
"""

from __future__ import annotations

from typing import Any

from opsd_core.algorithm.prompts import student_messages
from opsd_core.data.verify import answers_match, extract_answer, last_number

EXACT_MATCH = "exact_match"
# the last number of the completion, "####" or not (lm-eval gsm8k's "flexible-extract" idea)
EXACT_MATCH_FLEX = "exact_match_flex"
HAS_ANSWER = "has_answer"
# lm-eval's per-problem value of a log-likelihood task: the summed log-probability of the reference
# solution; opsd divides by its token count afterwards (harness), which needs the model's tokenizer
LOGLIKELIHOOD = "loglikelihood"


def doc_to_text(doc: dict[str, Any]) -> str:
    """The user message of the student context; lm-eval wraps it in the chat template.

    The training student prompt is the chat template over :func:`student_messages`; lm-eval with
    ``apply_chat_template=True`` renders ``[{"role": "user", "content": doc_to_text(doc)}]``, so the
    two agree only while the student context is one user message. Fail loudly if that changes.
    """
    messages = student_messages(str(doc["problem"]))
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise ValueError(
            "opsd evaluation expects the student context to be a single user message; "
            f"prompts.student_messages returned roles {[m.get('role') for m in messages]}"
        )
    return messages[0]["content"]


def _flatten(results: list[Any]) -> list[str]:
    """lm-eval passes one entry per request; with the take_first_k filter that entry is the k samples."""
    out: list[str] = []
    for item in results:
        if isinstance(item, (list, tuple)):
            out.extend(str(x) for x in item)
        else:
            out.append(str(item))
    return out


def sample_correctness(doc: dict[str, Any], completions: list[str]) -> list[int]:
    """1 per completion whose extracted final answer matches ``doc["answer"]``, else 0."""
    target = str(doc["answer"])
    return [int(answers_match(extract_answer(c), target)) for c in completions]


def flexible_correctness(doc: dict[str, Any], completions: list[str]) -> list[int]:
    """1 per completion whose last number matches ``doc["answer"]`` (no answer format required), else 0."""
    target = str(doc["answer"])
    return [int(answers_match(last_number(c), target)) for c in completions]


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """lm-eval hook: per-problem exact match (strict and flexible) averaged over the k samples (avg@k),
    and the answer rate."""
    completions = _flatten(results)
    if not completions:
        return {EXACT_MATCH: 0.0, EXACT_MATCH_FLEX: 0.0, HAS_ANSWER: 0.0}
    correct = sample_correctness(doc, completions)
    flexible = flexible_correctness(doc, completions)
    answered = [extract_answer(c) is not None for c in completions]
    return {
        EXACT_MATCH: sum(correct) / len(correct),
        EXACT_MATCH_FLEX: sum(flexible) / len(flexible),
        HAS_ANSWER: sum(answered) / len(answered),
    }


def process_loglikelihood(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """lm-eval hook of the log-likelihood tasks: the continuation's summed log-probability."""
    ll, _greedy = results[0]
    return {LOGLIKELIHOOD: float(ll)}
