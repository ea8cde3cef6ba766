"""Generated multi-step arithmetic word problems with verified step-by-step traces.

A task within a small model's reach (SmolLM2-135M solves few GSM8K problems, so OPSD there has no
self-teacher gap to distil; issue 23): "Caro has 30 books. Then Caro gets 22 more books. How many
books does Caro have now?" with the trace ``30 + 22 = 52\\n#### 52``. The difficulty is set by the number
of operations, the size of the numbers and the count of distractor sentences (irrelevant numbers).

Byte-reproducible: only :class:`random.Random` with an integer seed (whose integer draws are fixed across
Python versions and platforms) and fixed word lists decide a row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opsd_core.data.schema import Trace

ARITHMETIC_SOURCE = "opsd/arithmetic"

_NAMES = (
    "Ada", "Ben", "Caro", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nia",
    "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wen", "Yara", "Zoe",
)
_ITEMS = (
    "books", "apples", "stamps", "marbles", "pencils", "shells", "cards", "coins", "stickers", "beads",
    "eggs", "plums", "buttons", "rocks", "tickets",
)
_OTHER_ITEMS = ("hats", "cups", "kites", "socks", "spoons", "lamps")


@dataclass(frozen=True)
class ArithmeticDifficulty:
    """``steps``: operations per problem; ``max_number``: the largest number drawn; ``distractors``:
    sentences with a number that does not enter the answer."""

    steps: int = 2
    max_number: int = 50
    distractors: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_number < 2 or self.distractors < 0:
            raise ValueError(f"invalid arithmetic difficulty {self}")

    @property
    def label(self) -> str:
        return f"s{self.steps}-n{self.max_number}-d{self.distractors}"


def _operation(rng: random.Random, name: str, item: str, total: int, max_number: int) -> tuple[str, str, int]:
    """One step: (sentence, trace line, new total). Subtraction only where it keeps the total positive;
    multiplication only on small totals, so numbers stay in the model's reach."""
    kinds = ["add"]
    if total > 1:
        kinds.append("sub")
    if total <= max_number // 2 and total * 2 <= 10 * max_number:
        kinds.append("mul")
    kind = rng.choice(kinds)
    if kind == "add":
        n = rng.randint(1, max_number)
        verb = rng.choice(("gets", "finds", "buys", "is given"))
        return f"Then {name} {verb} {n} more {item}.", f"{total} + {n} = {total + n}", total + n
    if kind == "sub":
        n = rng.randint(1, total - 1)
        verb = rng.choice(("gives away", "loses", "sells", "uses"))
        return f"Then {name} {verb} {n} {item}.", f"{total} - {n} = {total - n}", total - n
    n = rng.randint(2, 4)
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[n]
    return f"Then {name} {word} the number of {item}.", f"{total} * {n} = {total * n}", total * n


def _distractor(rng: random.Random, name: str, max_number: int) -> str:
    other = rng.choice([n for n in _NAMES if n != name])
    return f"{other} has {rng.randint(1, max_number)} {rng.choice(_OTHER_ITEMS)}."


def arithmetic_problem(rng: random.Random, difficulty: ArithmeticDifficulty) -> tuple[str, str, str]:
    """(problem, step-by-step solution ending in ``#### answer``, answer) drawn from ``rng``."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, difficulty.max_number)
    sentences, lines = [f"{name} has {total} {item}."], []
    for _ in range(difficulty.steps):
        sentence, line, total = _operation(rng, name, item, total, difficulty.max_number)
        sentences.append(sentence)
        lines.append(line)
    for _ in range(difficulty.distractors):  # anywhere after the first sentence
        sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, name, difficulty.max_number))
    problem = " ".join([*sentences, f"How many {item} does {name} have now?"])
    return problem, "\n".join([*lines, f"#### {total}"]), str(total)


def arithmetic_rows(size: int, seed: int, difficulty: ArithmeticDifficulty) -> list[Trace]:
    """``size`` distinct problems (no problem text twice), fixed by ``seed`` and ``difficulty``."""
    rng = random.Random(f"opsd-arithmetic/{seed}/{difficulty.label}")
    rows: list[Trace] = []
    seen: set[str] = set()
    misses = 0
    while len(rows) < size:
        problem, solution, answer = arithmetic_problem(rng, difficulty)
        if problem in seen:
            misses += 1
            if misses > 5000:  # this many repeats in a row: the difficulty's space is exhausted
                raise ValueError(f"cannot draw {size} distinct problems at difficulty {difficulty.label} "
                                 f"(found {len(rows)}): raise max_number or steps")
            continue
        misses = 0
        seen.add(problem)
        rows.append(Trace(
            id=f"arithmetic-{difficulty.label}-{seed}-{len(rows)}",
            problem=problem, solution=solution, answer=answer, source=ARITHMETIC_SOURCE,
            meta={"seed": seed, "index": len(rows), "steps": difficulty.steps,
                  "max_number": difficulty.max_number, "distractors": difficulty.distractors},
        ))
    return rows
