"""Final-answer extraction and comparison.

Shared by the prepare stage (verifying reference traces) and the evaluation (exact match of model
completions), so both sides agree on what "the same answer" means.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_HASH_MARKER = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")


def _last_hash_answer(text: str) -> tuple[int, str] | None:
    """Position and text after the last ``####`` marker (up to the end of that line)."""
    pos = text.rfind(_HASH_MARKER)
    if pos < 0:
        return None
    rest = text[pos + len(_HASH_MARKER):].lstrip("#")
    value = rest.split("\n", 1)[0].strip()
    return (pos, value) if value else None


def _balanced_end(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or None if unbalanced."""
    depth = 0
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_boxed_answer(text: str) -> tuple[int, str] | None:
    """Position and content of the last balanced ``\\boxed{...}`` (nested braces allowed)."""
    best: tuple[int, str] | None = None
    for match in _BOXED.finditer(text):
        open_pos = match.end() - 1
        end = _balanced_end(text, open_pos)
        if end is None:
            continue
        content = text[open_pos + 1:end].strip()
        if content:
            best = (match.start(), content)
    return best


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``: after ``#### `` or inside the last ``\\boxed{}``.

    When both forms occur, the one written last wins (a completion may restate its answer).
    Returns the raw answer text (not normalised) or None if there is none.
    """
    if not isinstance(text, str):
        return None
    candidates = [c for c in (_last_hash_answer(text), _last_boxed_answer(text)) if c is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


_LAST_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?|[+-]?\.\d+")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (the flexible extraction: no ``####`` needed), or None."""
    if not isinstance(text, str):
        return None
    found = _LAST_NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def _canonical_number(s: str) -> str | None:
    """Canonical text of a finite decimal number ("18.0" -> "18", "-0.50" -> "-0.5"), else None."""
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_answer(s: str) -> str:
    """Normalise an answer for comparison.

    Strips whitespace, ``$`` and ``%`` signs, LaTeX ``\\text{}`` wrappers and a trailing ``.``;
    numbers become canonical decimals (thousands separators removed, "18.00" -> "18");
    ``\\frac{a}{b}`` becomes ``a/b`` and fractions are then compared as text; other text is
    lower-cased with whitespace collapsed.
    """
    out = str(s).strip()
    out = out.replace("\u2212", "-")  # unicode minus
    out = _TEXT_WRAPPER.sub(r"\1", out)
    out = _FRAC.sub(r"\1/\2", out)
    out = out.replace("\\$", "").replace("\\%", "").replace("$", "").replace("%", "")
    out = out.replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    out = out.strip().rstrip(".").strip()
    number = _canonical_number(out.replace(" ", ""))
    if number is not None:
        return number
    if "/" in out:
        # fractions as text: "3 / 4" and "3/4" are the same answer, 0.75 is not
        out = out.replace(" ", "")
    return " ".join(out.lower().split())


def answers_match(a: str | None, b: str | None) -> bool:
    """True when both answers are present and equal after :func:`normalize_answer`."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na) and na == nb
