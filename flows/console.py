"""What the main job prints on the terminal: a start and a "done" line per stage with its key figure, the
stage's progress on one updating line (a TTY) or a few plain lines (a log file), and warnings. Everything a
stage prints also goes to its Prefect task run's log, whole; the terminal gets the news.

Pure formatting (``stage_figure``, ``is_progress``, ``keep_plain``) is separate from the writer, so the choice
of lines is tested without a terminal.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from opsd_core.evaluation.summary import task_summary

_STEP = re.compile(r"^step (\d+)/(\d+)\b")
_EVAL = re.compile(r"^evaluate(_base)?: (\d+/)?\d+ groups of tasks")
_NEWS = re.compile(r"\b(warning|error|rejected|refused|resumed|resuming)\b", re.IGNORECASE)
_JSON = re.compile(r'^\s*("[^"]*":|[{}\[\]],?\s*$)')  # a line of a stage's JSON result: the done line has its figure


def is_progress(line: str) -> bool:
    """A training step or an evaluation group: the line a TTY rewrites in place."""
    return bool(_STEP.match(line) or _EVAL.match(line))


def keep_plain(line: str) -> bool:
    """Without a TTY, the progress lines kept: a quarter of the training's steps at a time, every evaluation
    group (a handful per stage)."""
    if (m := _STEP.match(line)) is not None:
        step, total = int(m.group(1)), int(m.group(2))
        quarter = max(1, total // 4)
        return step == 1 or step == total or step % quarter == 0
    return bool(_EVAL.match(line))


def is_news(line: str) -> bool:
    """A line the terminal shows as it is (a warning, rejected rows, a resumed training)."""
    return bool(_NEWS.search(line)) and not is_progress(line) and not _JSON.match(line)


def stage_figure(stage: str, report: dict[str, Any] | None) -> str:
    """The one figure a stage's "done" line carries, from its report (empty when there is none)."""
    if not report:
        return ""
    if stage == "prepare":
        reasons = {k: v for k, v in (report.get("rejected_by_reason") or {}).items() if v}
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        out = f"{report.get('accepted')} of {report.get('read')} rows kept (train {report.get('train')}, " \
              f"val {report.get('val')})"
        if report.get("rejected"):
            out += f"; {report['rejected']} rejected ({why})"
            if reasons.get("contamination"):
                out += "; contamination = overlap with the evaluation sets, removed on purpose"
        return out
    if stage == "train":
        first, final = report.get("first_loss"), report.get("final_loss")
        loss = f", loss {first:.4g} -> {final:.4g}" if isinstance(first, float) and isinstance(final, float) else ""
        return f"{report.get('steps')} steps{loss}"
    if stage == "evaluate":
        rows = task_summary(report)
        return "; ".join(f"{task} {_num(r['base'])} -> {_num(r['candidate'])}" for task, r in rows.items()
                         if not task.endswith("_flex"))
    if stage == "register":
        if report.get("already_registered"):
            return f"v{report.get('version')} already registered (same weights)"
        return f"v{report.get('version')}, gate: {'promoted' if report.get('promoted') else 'not promoted'}"
    return ""


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "-"


class Console:
    """Writes the terminal's lines; ``tty`` rewrites progress in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._open = False  # a progress line is on screen, not yet ended

    @property
    def stream(self) -> TextIO:
        # sys.stderr as it is now, not at import: test runners and daemons replace it
        return self._stream or sys.stderr

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _end_progress(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False

    def line(self, text: str) -> None:
        self._end_progress()
        self.stream.write(text + "\n")
        self.stream.flush()

    def stage_output(self, stage: str, line: str) -> None:
        shown = f"  {stage}: {line.removeprefix(f'{stage}: ')}"  # the evaluation names its stage itself
        if is_progress(line):
            if self.tty:
                self.stream.write(f"\r\x1b[2K{shown}"[:200])
                self._open = True
                self.stream.flush()
            elif keep_plain(line):
                self.line(shown)
        elif is_news(line):
            self.line(shown)

    def stage_done(self, stage: str, ran: bool, seconds: float, figure: str) -> None:
        if not ran:
            self.line(f"{stage}: unchanged, skipped")
            return
        self.line(f"{stage}: done in {seconds:.0f} s" + (f": {figure}" if figure else ""))
