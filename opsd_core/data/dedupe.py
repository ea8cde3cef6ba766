"""Problem-text normalisation and exact deduplication."""

from __future__ import annotations

import hashlib
import unicodedata


def normalize_problem(text: str) -> str:
    """Lower-cased, punctuation-free, whitespace-collapsed problem text.

    Punctuation becomes a space (not nothing) so that "3.5" and "35" stay different problems.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    chars = [" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text]
    return " ".join("".join(chars).split())


def problem_key(text: str) -> str:
    """Hex digest identifying a problem up to :func:`normalize_problem`."""
    return hashlib.sha256(normalize_problem(text).encode("utf-8")).hexdigest()


class Deduplicator:
    """Remembers accepted problems; the first accepted occurrence wins."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def first_id(self, problem: str) -> str | None:
        """Id of the already accepted row with the same normalised problem, if any."""
        return self._seen.get(problem_key(problem))

    def add(self, problem: str, row_id: str) -> None:
        self._seen.setdefault(problem_key(problem), row_id)
