"""The self-teacher gap, measured before training: how much better the model answers with the verified
solution in its context than without it. OPSD distils exactly that gap; where there is none, it has
nothing to teach (the final gain was found roughly linear in this initial gap: issue 23).

:func:`measure` runs the model (the trainer's sampler, teacher and student passes); :func:`reading` turns the
figures into one plain sentence and is pure.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opsd_core.algorithm.losses import chunked_divergence_loss
from opsd_core.algorithm.rollout import Rollouts, sample
from opsd_core.algorithm.scoring import build_scoring_batch, lm_head, right_pad
from opsd_core.evaluation.metrics import flexible_correctness, sample_correctness
from opsd_core.io import write_json

if TYPE_CHECKING:
    from opsd_core.algorithm.trainer import OPSDTrainer, Problem

# the diagnosis's noise seeds lie far from the training rows' ((seed * 1_000_003 + step) * 1_000_003 + row)
_SEED_BASE = 7_777_777_777


@dataclass(frozen=True)
class Gap:
    """Accuracies are fractions of ``problems`` (strict: a ``#### N`` line; flexible: the last number).
    ``divergence``: the training divergence per token between teacher and student on the student's own
    rollouts at the training temperature (nats). ``answer_ll_gap``: the teacher's minus the student's mean
    log-likelihood per token of the reference answer line behind the rest of the reference solution."""

    problems: int
    student_greedy: float
    teacher_greedy: float
    student_greedy_flex: float
    teacher_greedy_flex: float
    student_sampled: float
    teacher_sampled: float
    divergence: float
    answer_ll_gap: float

    @property
    def accuracy_gap(self) -> float:
        """Greedy teacher minus student, the better of the two extractions' gaps (points of 1.0)."""
        return max(self.teacher_greedy - self.student_greedy, self.teacher_greedy_flex - self.student_greedy_flex)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_gap": self.accuracy_gap, "reading": reading(self)}


def reading(gap: Gap, room: float = 0.10) -> str:
    """One sentence on what the gap means for OPSD (``room``: the accuracy gap that counts as room)."""
    points = round(100 * gap.accuracy_gap)
    best_teacher = max(gap.teacher_greedy, gap.teacher_greedy_flex)
    best_student = max(gap.student_greedy, gap.student_greedy_flex)
    if gap.accuracy_gap >= room:
        return f"the teacher is {points} points better than the student: room for OPSD"
    if gap.accuracy_gap <= -room:
        return (f"the teacher is {-points} points worse than the student: the privileged context confuses the "
                "model; OPSD would teach the wrong thing")
    if best_teacher < room:
        return ("no gap: even with the solution in its context the model solves almost nothing "
                f"({100 * best_teacher:.0f}%); OPSD has nothing to distil (an easier task, or SFT first)")
    if best_student >= 1 - room:
        return f"no gap: the student already solves {100 * best_student:.0f}%; little left to distil"
    if gap.answer_ll_gap > 0.5:
        return (f"a small accuracy gap ({points:+d} points) but the teacher is much surer of the reference answer "
                f"(+{gap.answer_ll_gap:.2f} nats/token): some room for OPSD")
    return f"no gap ({points:+d} points): OPSD has little to distil"


def render(gap: Gap) -> str:
    """A small table and the reading, for the terminal."""
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    return "\n".join([
        f"self-teacher gap on {gap.problems} training problems (before training):",
        "                      student  teacher",
        f"  greedy, strict      {pct(gap.student_greedy)}   {pct(gap.teacher_greedy)}",
        f"  greedy, flexible    {pct(gap.student_greedy_flex)}   {pct(gap.teacher_greedy_flex)}",
        f"  sampled, flexible   {pct(gap.student_sampled)}   {pct(gap.teacher_sampled)}",
        f"  divergence on the student's rollouts: {gap.divergence:.4f} nats/token",
        f"  answer line, teacher - student: {gap.answer_ll_gap:+.3f} nats/token",
        f"  -> {reading(gap)}",
    ])


def pick(problems: list[Problem], n: int, seed: int) -> list[Problem]:
    """``n`` problems (all if fewer) in a seeded order: the same sample for the same data and seed."""
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 7919 + 31)).tolist()
    return [problems[i] for i in order[:n]]


def _correct(texts: list[str], answers: list[str]) -> tuple[float, float]:
    # the evaluation's own exact-match rules (strict: '#### N' or a boxed answer; flexible: the last number)
    strict = sum(sample_correctness({"answer": a}, [t])[0] for t, a in zip(texts, answers, strict=True))
    flex = sum(flexible_correctness({"answer": a}, [t])[0] for t, a in zip(texts, answers, strict=True))
    return strict / len(texts), flex / len(texts)


def _texts(trainer: OPSDTrainer, rollouts: Rollouts) -> list[str]:
    return [trainer.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask, strict=True)]


def _answer_ll(trainer: OPSDTrainer, batch: list[Problem], teacher: bool) -> list[float]:
    """Per problem: mean log-probability per token of the reference answer line behind the student's (or the
    teacher's) context and the solution's earlier lines."""
    ids, mask = right_pad([p.solution_ids for p in batch], trainer.pad_id)
    prompts = [p.teacher_ids if teacher else p.student_ids for p in batch]
    sb = build_scoring_batch(prompts, ids, mask, trainer.pad_id).to(trainer.device)
    hidden = trainer.teacher.hidden(sb) if teacher else trainer.student_hidden(sb)
    weight = trainer.teacher.lm_head_weight() if teacher else lm_head(trainer.model).weight
    logp = torch.log_softmax(torch.nn.functional.linear(hidden.float(), weight.float()), -1)
    picked = logp.gather(-1, ids.to(trainer.device)[..., None]).squeeze(-1).cpu()
    out = []
    for row, p in enumerate(batch):
        span = picked[row, p.answer_from:len(p.solution_ids) - 1]  # the answer line, not the EOS after it
        out.append(float(span.mean()) if span.numel() else 0.0)
    return out


@torch.no_grad()
def measure(trainer: OPSDTrainer, problems: list[Problem], batch_size: int = 8) -> Gap:
    """The gap on ``problems`` with the trainer's current weights (the starting model before training).

    Draws from the trainer's sampler with its own noise seeds (training's rows are not touched) and leaves
    the global RNG as it found it, so a training that starts after it takes the same steps.
    """
    if not problems:
        raise ValueError("the diagnosis needs at least one problem")
    rng = torch.get_rng_state()
    cfg = trainer.params.opsd.sampling
    greedy = cfg.model_copy(update={"top_k": 1, "min_new_tokens": 0})
    sampled = cfg.model_copy(update={"min_new_tokens": 0})
    answers = [p.answer for p in problems]
    texts: dict[str, list[str]] = {k: [] for k in ("sg", "tg", "ss", "ts")}
    div_sum = tokens = 0.0
    ll_gap: list[float] = []
    module = trainer.backend.sampling_module()
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for lo in range(0, len(problems), batch_size):
            part = problems[lo:lo + batch_size]
            seeds = [_SEED_BASE + lo + i for i in range(len(part))]
            for key, cfg_, role in (("sg", greedy, "student_ids"), ("tg", greedy, "teacher_ids"),
                                    ("ss", sampled, "student_ids"), ("ts", sampled, "teacher_ids")):
                out = sample(module, [getattr(p, role) for p in part], cfg_, trainer.pad_id, trainer.eos_ids, seeds,
                             trainer.device, options=trainer.backend.generate_options)
                texts[key] += _texts(trainer, out)
                if key == "ss":
                    student_rollouts = out
            width = max(1, int(student_rollouts.completion_mask.sum(1).max()))
            ids = student_rollouts.completion_ids[:, :width]
            mask = student_rollouts.completion_mask[:, :width]
            sb = build_scoring_batch([p.student_ids for p in part], ids, mask, trainer.pad_id).to(trainer.device)
            tb = build_scoring_batch([p.teacher_ids for p in part], ids, mask, trainer.pad_id).to(trainer.device)
            _, metrics = chunked_divergence_loss(
                trainer.student_hidden(sb), trainer.teacher.hidden(tb), lm_head(trainer.model).weight,
                mask.to(trainer.device), trainer.spec, sampled_ids=ids.to(trainer.device),
                chunk_size=trainer.params.opsd.chunk_size, teacher_lm_head_weight=trainer.teacher.lm_head_weight())
            div_sum += float(metrics["kl_sum"])
            tokens += float(metrics["tokens"])
            ll_gap += [t - s for t, s in zip(_answer_ll(trainer, part, True), _answer_ll(trainer, part, False),
                                             strict=True)]
    finally:
        trainer.model.train(was_training)
        torch.set_rng_state(rng)
    sg, sgf = _correct(texts["sg"], answers)
    tg, tgf = _correct(texts["tg"], answers)
    return Gap(
        problems=len(problems), student_greedy=sg, teacher_greedy=tg, student_greedy_flex=sgf,
        teacher_greedy_flex=tgf, student_sampled=_correct(texts["ss"], answers)[1],
        teacher_sampled=_correct(texts["ts"], answers)[1], divergence=div_sum / max(tokens, 1.0),
        answer_ll_gap=sum(ll_gap) / len(ll_gap),
    )


def record_gap(trainer: OPSDTrainer, cache: Path | None,
               log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any] | None:
    """Measure (or read from ``cache``, the run's own record: a resumed run keeps its first diagnosis) and
    log the gap of the trainer's starting weights; None when ``opsd.diagnose_problems`` is 0."""
    n = trainer.params.opsd.diagnose_problems
    if n == 0:
        return None
    if cache is not None and cache.is_file():
        record = json.loads(cache.read_text())
        log(f"self-teacher gap (measured when this run started): {record['reading']}")
        return record
    gap = measure(trainer, pick(trainer.problems, n, trainer.params.train.seed))
    log(render(gap))
    record = gap.to_dict()
    if cache is not None:
        write_json(cache, record)
    return record
