"""Word n-gram overlap between training problems and the evaluation problems."""

from __future__ import annotations

from collections.abc import Iterable

from opsd_core.data.dedupe import normalize_problem


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one gram of itself.

    The short-text rule keeps a short evaluation problem detectable when copied verbatim.
    """
    words = normalize_problem(text).split()
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class ContaminationIndex:
    """Index of the evaluation problems' n-grams; answers "which evaluation problem overlaps?"."""

    def __init__(self, eval_problems: Iterable[tuple[str, str]], n: int) -> None:
        """``eval_problems``: (id, problem text) pairs; ``n``: words per gram (>= 1)."""
        if n < 1:
            raise ValueError(f"contamination n-gram size must be >= 1, got {n}")
        self.n = n
        self._owner: dict[tuple[str, ...], str] = {}
        self.size = 0
        for eval_id, text in eval_problems:
            self.size += 1
            for gram in word_ngrams(text, n):
                self._owner.setdefault(gram, eval_id)

    def match(self, text: str) -> tuple[str, str] | None:
        """(evaluation id, shared n-gram as text) for the first overlap found, else None."""
        # sorted so that the reported evidence does not depend on set iteration order
        for gram in sorted(word_ngrams(text, self.n)):
            owner = self._owner.get(gram)
            if owner is not None:
                return owner, " ".join(gram)
        return None
