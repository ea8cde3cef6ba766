"""The OPSD loop: rollout → teacher/student scoring → global-token-mean loss → optimizer step.

One optimizer step consumes ``rollouts_per_step`` problems: all rollouts are sampled in one batch,
then scored in micro-batches whose losses are divided by the step's *total* number of valid
completion tokens, so gradient accumulation gives exactly the full-batch token mean.
Sampling seeds and the data order are functions of the step index, and checkpoints carry the
optimizer, scheduler, teacher (EMA) and RNG state, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from opsd_core import checkpoint as ckpt
from opsd_core.algorithm.losses import DivergenceSpec, chunked_divergence_loss, token_nll_sum
from opsd_core.algorithm.prompts import student_prompt_ids, teacher_prompt_ids
from opsd_core.algorithm.rollout import Rollouts, eos_token_ids, sample
from opsd_core.algorithm.scoring import (
    ScoringBatch,
    assert_same_completion,
    build_scoring_batch,
    completion_hidden,
    lm_head,
    right_pad,
)
from opsd_core.algorithm.teacher import Teacher
from opsd_core.backends import distributed as dist
from opsd_core.backends import fsdp
from opsd_core.backends.base import Backend
from opsd_core.config import Params
from opsd_core.errors import OpsdError
from opsd_core.io import json_hash

CURVE_FIELDS = [
    "step", "loss", "kl", "clipped_frac", "completion_len", "ended_frac",
    "sample_tok_s", "train_tok_s", "lr", "grad_norm", "sft_loss",
]


class TrainingError(OpsdError, RuntimeError):
    """Training cannot continue (non-finite loss, no tokens, ...); no candidate is written."""


@dataclass
class Problem:
    """A training problem's token ids: the student's context, the teacher's, and the verified solution
    followed by the end-of-sequence token (the SFT target behind the student's context)."""

    id: str
    student_ids: list[int]
    teacher_ids: list[int]
    solution_ids: list[int] = field(default_factory=list)
    answer: str = ""
    answer_from: int = 0  # where the solution's last line (the answer line) starts in solution_ids
    # the teacher's context with another problem's solution (opsd.contrast: shuffled), else empty
    wrong_ids: list[int] = field(default_factory=list)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    curve: list[dict[str, float]] = field(default_factory=list)


def load_problems(path: Path, tokenizer: Any, thinking: bool | None = None, context: str = "reference",
                  seed: int = 0, instruction: str | None = None, contrast: bool = False) -> list[Problem]:
    """Tokenize both contexts of every prepared training row once (``thinking``: ``model.thinking``).

    ``context`` is ``opsd.teacher_context``, what privileged information the teacher gets:
    ``reference`` its own problem's verified solution; ``shuffled`` another problem's (see
    :func:`shuffled_partners`), the control for "the gain comes from the solution, not from the extra
    prompt or from training on its own samples"; ``none`` the student's own prompt (no privileged context).
    ``instruction``: ``opsd.teacher_instruction`` (None: the built-in one). ``contrast``: also build the
    teacher's context with the shuffled partner's solution (``wrong_ids``, for ``opsd.contrast``).
    """
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    if not rows:
        raise TrainingError(f"{path}: no training problems (run `opsd prepare` first)")
    shuffled = shuffled_partners(len(rows), seed)
    partner = shuffled if context == "shuffled" else list(range(len(rows)))
    problems = []
    for i, row in enumerate(rows):
        student = student_prompt_ids(tokenizer, row["problem"], thinking)
        teacher = student if context == "none" else \
            teacher_prompt_ids(tokenizer, row["problem"], rows[partner[i]]["solution"], thinking, instruction)
        target = solution_ids(tokenizer, row["solution"])
        wrong = teacher_prompt_ids(tokenizer, row["problem"], rows[shuffled[i]]["solution"], thinking, instruction) \
            if contrast else []
        problems.append(Problem(str(row["id"]), student, teacher, target, str(row.get("answer") or ""),
                                answer_line_start(tokenizer, row["solution"], target), wrong))
    return problems


def solution_ids(tokenizer: Any, solution: str) -> list[int]:
    """The verified solution as the student would write it behind its prompt: its tokens, then EOS."""
    ids = list(tokenizer(solution.strip(), add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def answer_line_start(tokenizer: Any, solution: str, ids: list[int]) -> int:
    """The index in ``ids`` (:func:`solution_ids`) of the last line's first token: the tokens the earlier
    lines' own tokenization shares with the whole (a merge across the line break is left to the answer)."""
    text = solution.strip()
    cut = text.rfind("\n") + 1
    if cut == 0:
        return 0
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    shared = 0
    for a, b in zip(head, ids, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def shuffled_partners(n: int, seed: int) -> list[int]:
    """A seeded derangement of ``range(n)``: problem ``i`` gets the solution of problem ``out[i] != i``
    (for ``n`` >= 2): a seeded permutation, each entry paired with the next one in it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104729)).tolist()
    out = [0] * n
    for k, i in enumerate(order):
        out[i] = order[(k + 1) % n]
    return out


def step_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Problem indices for optimizer step ``step``: a fresh seeded permutation per epoch (stateless)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n)
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return out


def run_key(params: Params, data_hash: str) -> str:
    """Identifies a training run: checkpoints from other params or data are never resumed."""
    dump = params.model_dump(mode="json")
    volatile = {"threads", "nproc", "cpu_allocator", "progress", "keep_checkpoints", "checkpoint_every", "checkpoint_dir",
                "output_dir", "reports_dir"}
    train = {k: v for k, v in dump["train"].items() if k not in volatile}
    return json_hash({"model": dump["model"], "lora": dump["lora"], "opsd": dump["opsd"], "train": train,
                      "data": data_hash})


@dataclass
class TrainerParts:
    """What the loop is built from; ``opsd_core.stages.train.build_parts`` makes them from the params."""

    teacher: Teacher
    backend: Backend
    spec: DivergenceSpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


class OPSDTrainer:
    def __init__(
        self,
        params: Params,
        model: nn.Module,
        tokenizer: Any,
        problems: list[Problem],
        parts: TrainerParts,
        device: torch.device,
        run_dir: Path,
        world: dist.World | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    ) -> None:
        """``world``: this process's rank among several (:mod:`opsd_core.backends.distributed`; default: alone)."""
        self.params, self.model, self.tokenizer = params, model, tokenizer
        self.world = world or dist.World()
        self.problems, self.device, self.run_dir, self.log = problems, device, run_dir, log
        # called on the main rank with each step's row of the curve (the live MLflow metrics, stages/train.py)
        self.on_step: Callable[[dict[str, float]], None] | None = None
        self.cfg = params.train
        self.teacher, self.backend, self.spec = parts.teacher, parts.backend, parts.spec
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # FSDP2 (full fine-tuning on several ranks): every rank holds a shard of each trained tensor
        self.sharded = fsdp.is_sharded(model)
        self.state = TrainState()

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any] | None:
        """Whole tensors, whatever the sharding (the layout one process writes): any world size resumes it.
        Rank 0's; None elsewhere. Sharded, every rank must call it (the shards are gathered, and dropped
        at once by the ranks that do not write)."""
        keep = self.world.main
        trainable = fsdp.gather_to_host(self.trainable, keep)
        optimizer = fsdp.full_optimizer_state(self.optimizer.state_dict(), keep)
        if not keep:
            return None
        return {
            "step": self.state.step,
            "curve": self.state.curve,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "teacher": self.teacher.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes (every rank holds the same weights and optimizer state, or gathers them with the
        others when sharded); the others wait for it."""
        state = self._state() if self.world.main or self.sharded else None
        path = ckpt.save(self.run_dir, self.state.step, state, self.cfg.keep_checkpoints) if state is not None else None
        dist.barrier(self.world)
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint that loads; a damaged newer one is skipped, and the log says so."""
        found, state = None, None
        for candidate in ckpt.complete(self.run_dir):
            try:
                state = ckpt.load(candidate)
            except ckpt.CheckpointError as err:
                self.log(f"skipping checkpoint: {err}")
                continue
            found = candidate
            break
        if found is None or state is None:
            return False
        missing = set(self.trainable) ^ set(state["trainable"])
        if missing:
            raise TrainingError(f"checkpoint {found.path} does not match the model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, p in self.trainable.items():  # sharded: this rank's piece of the whole tensor
                p.copy_(fsdp.shard_like(state["trainable"][name].to(p.device, p.dtype), p))
        self.optimizer.load_state_dict(state["optimizer"])
        fsdp.reshard_optimizer_state(self.optimizer)  # whole moments in the file, shards in the optimizer
        self.scheduler.load_state_dict(state["scheduler"])
        self.teacher.load_state_dict(state["teacher"])
        ckpt.set_rng_state(state["rng"])
        self.state = TrainState(state["step"], state["curve"])
        self.log(f"resumed from {found.path} (step {self.state.step}/{self.cfg.steps})")
        return True

    # -- one optimizer step ------------------------------------------------------------------
    def row_seed(self, step: int, row: int) -> int:
        """The noise seed of rollout ``row`` of optimizer step ``step``: the same on any rank, in any batch."""
        return (self.cfg.seed * 1_000_003 + step) * 1_000_003 + row

    def rollout(self, batch: list[Problem], step: int, rows: list[int] | None = None) -> Rollouts:
        """Sample the step's rollouts ``rows`` (indices into ``batch``; default all), each from its own noise."""
        rows = list(range(len(batch))) if rows is None else rows
        return sample(self.backend.sampling_module(), [batch[i].student_ids for i in rows], self.params.opsd.sampling,
                      self.pad_id, self.eos_ids, [self.row_seed(step, i) for i in rows], self.device,
                      options=self.backend.generate_options)

    def batch_for(self, step: int) -> list[Problem]:
        return [self.problems[i] for i in step_indices(step, self.cfg.rollouts_per_step,
                                                        len(self.problems), self.cfg.seed)]

    def student_hidden(self, batch: ScoringBatch) -> Tensor:
        """The student's completion hidden states [B, L, H], with grad (frozen linears through the packs)."""
        with self.backend.student_pass(self.model):
            return completion_hidden(self.model, batch)

    def accumulate(self, batch: list[Problem], rollouts: Rollouts, bar: Any = None,
                   scale: float = 1.0) -> dict[str, float]:
        """Forward/backward over micro-batches; the loss is the mean over all the step's valid tokens (on
        every rank: ``batch`` and ``rollouts`` are this rank's share, the denominator the step's total).
        ``scale``: the weight of this term's gradient in the objective (``mix``); the reported loss is unscaled."""
        total = int(dist.all_sum([float(rollouts.num_tokens)], self.world, self.device)[0])
        if total == 0:
            raise TrainingError("the rollouts hold no completion tokens")
        self.model.train()
        loss_sum = kl_sum = clipped_sum = 0.0
        mb = self.cfg.micro_batch_size
        lengths = rollouts.completion_mask.sum(dim=1)
        # micro-batches of similar total length, each cut to its longest completion: padding is
        # compute spent on nothing, and the loss is a sum over tokens, so grouping does not change it
        order = sorted(range(len(batch)), key=lambda i: (len(batch[i].student_ids) + int(lengths[i]), i))
        passes = math.ceil(len(batch) / mb)
        # sharded, every pass is a collective of all ranks: a rank with fewer rows joins the others' extra
        # passes idly (counted before the first pass, since counting is a collective too)
        idle = int(dist.all_max(float(passes), self.world, self.device)) - passes if self.sharded else 0
        for lo in range(0, len(batch), mb):
            rows = order[lo:lo + mb]
            part = [batch[i] for i in rows]
            width = int(lengths[rows].max())
            ids = rollouts.completion_ids[rows, :width]
            mask = rollouts.completion_mask[rows, :width]
            s_batch = build_scoring_batch([p.student_ids for p in part], ids, mask, self.pad_id)
            t_batch = build_scoring_batch([p.teacher_ids for p in part], ids, mask, self.pad_id)
            assert_same_completion(s_batch, t_batch)
            s_batch, t_batch = s_batch.to(self.device), t_batch.to(self.device)
            t_hidden = self.teacher.hidden(t_batch)
            w_hidden = None
            if self.params.opsd.contrast != "none":
                if any(not p.wrong_ids for p in part):
                    raise TrainingError("opsd.contrast needs the problems' wrong-solution contexts (load_problems)")
                w_batch = build_scoring_batch([p.wrong_ids for p in part], ids, mask, self.pad_id)
                w_hidden = self.teacher.hidden(w_batch.to(self.device))
            s_hidden = self.student_hidden(s_batch)
            loss, metrics = chunked_divergence_loss(
                s_hidden, t_hidden, lm_head(self.model).weight, mask.to(self.device), self.spec,
                sampled_ids=ids.to(self.device), chunk_size=self.params.opsd.chunk_size, denom=total,
                teacher_lm_head_weight=self.teacher.lm_head_weight(), contrast_hidden=w_hidden,
                contrast_weight=self.params.opsd.contrast_weight,
                contrast_plausibility=self.params.opsd.contrast_plausibility,
            )
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}); stopping, no candidate is written")
            (loss if scale == 1.0 else loss * scale).backward()
            loss_sum += loss.item()
            kl_sum += float(metrics["kl_sum"])
            clipped_sum += float(metrics["clipped_sum"])
            if bar is not None:
                bar.update(len(part))
        for _ in range(idle):
            self._idle_pass()
        loss_sum, kl_sum, clipped_sum = dist.all_sum([loss_sum, kl_sum, clipped_sum], self.world, self.device)
        return {"loss": loss_sum, "kl": kl_sum / total, "clipped_frac": clipped_sum / total}

    def accumulate_sft(self, batch: list[Problem], scale: float = 1.0) -> tuple[float, int]:
        """The SFT term: the verified solutions' token-mean negative log-likelihood behind the student's
        context, over the step's solution tokens on all ranks (``batch``: this rank's share), micro-batch
        by micro-batch. Returns (the unscaled loss, the step's solution tokens)."""
        if any(not p.solution_ids for p in batch):
            raise TrainingError("a problem has no solution tokens for the SFT objective")
        total = int(dist.all_sum([float(sum(len(p.solution_ids) for p in batch))], self.world, self.device)[0])
        self.model.train()
        mb = self.cfg.micro_batch_size
        order = sorted(range(len(batch)), key=lambda i: (len(batch[i].student_ids) + len(batch[i].solution_ids), i))
        passes = math.ceil(len(batch) / mb)
        idle = int(dist.all_max(float(passes), self.world, self.device)) - passes if self.sharded else 0
        nll_sum = 0.0
        for lo in range(0, len(batch), mb):
            part = [batch[i] for i in order[lo:lo + mb]]
            ids, mask = right_pad([p.solution_ids for p in part], self.pad_id)
            s_batch = build_scoring_batch([p.student_ids for p in part], ids, mask, self.pad_id).to(self.device)
            nll = token_nll_sum(self.student_hidden(s_batch), lm_head(self.model).weight, ids.to(self.device),
                                mask.to(self.device), self.params.opsd.chunk_size) / total
            if not torch.isfinite(nll):
                raise TrainingError(f"non-finite SFT loss ({nll.item()}); stopping, no candidate is written")
            (nll if scale == 1.0 else nll * scale).backward()
            nll_sum += nll.item()
        for _ in range(idle):
            self._idle_pass()
        return dist.all_sum([nll_sum], self.world, self.device)[0], total

    def _idle_pass(self) -> None:
        """A student forward and backward of one pad token with zero loss: the all-gathers and (zero)
        reduce-scatters a sharded model's pass makes, for a rank that has no rows left this step."""
        ids = torch.tensor([[self.pad_id]])
        hidden = self.student_hidden(build_scoring_batch([[self.pad_id]], ids, torch.ones_like(ids),
                                                         self.pad_id).to(self.device))
        # the head's weight too: a parameter with a gradient on one rank must have one on all (the fixed
        # teacher, the only one FSDP2 runs with, is a separate copy: no collective to join there)
        ((hidden.sum() + lm_head(self.model).weight.sum()) * 0.0).backward()

    def optimizer_step(self) -> dict[str, float]:
        if not self.sharded:  # FSDP2 sums the shards' gradients in its reduce-scatter (backends/fsdp.py)
            dist.sum_gradients(self.trainable.values(), self.world)  # each rank's share of the global token mean
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        # over shards, the norm is the global one (the squares are summed over ranks) and every rank gets it
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), clip)))
        if not math.isfinite(grad_norm):
            raise TrainingError("non-finite gradient norm; stopping, no candidate is written")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update()
        return {"lr": lr, "grad_norm": grad_norm}

    def step(self, step: int, bar: Any = None) -> dict[str, float]:
        """One optimizer step of ``train.objective``: OPSD on fresh rollouts, SFT on the verified solutions
        (no rollouts), or both on the same problems with ``mix_weight`` on the SFT term."""
        objective, weight = self.cfg.objective, self.cfg.mix_weight
        batch = self.batch_for(step)
        rows = self.world.rows(len(batch))
        mine = [batch[i] for i in rows]
        rollouts = self.rollout(batch, step, rows) if objective != "sft" else None
        start = time.perf_counter()
        try:
            row: dict[str, float] = {}
            if rollouts is not None:
                row.update(self.accumulate(mine, rollouts, bar, scale=1.0 if objective == "opsd" else 1.0 - weight))
            if objective != "opsd":
                sft, sft_tokens = self.accumulate_sft(mine, scale=1.0 if objective == "sft" else weight)
                row["sft_loss"] = sft
                row["loss"] = sft if objective == "sft" else (1.0 - weight) * row["loss"] + weight * sft
            row.update(self.optimizer_step())
        except TrainingError as err:
            raise TrainingError(f"step {step + 1}: {err}") from None
        train_s = dist.all_max(time.perf_counter() - start, self.world, self.device)
        if rollouts is None:  # SFT: the solutions are the step's tokens; nothing was sampled
            row.update({"step": step + 1, "completion_len": sft_tokens / len(batch), "ended_frac": 1.0,
                        "train_tok_s": sft_tokens / max(train_s, 1e-9), "sample_s": 0.0, "train_s": train_s})
            return row
        # the whole step's figures: sums over ranks, the slowest rank's time
        total, ended = dist.all_sum([float(rollouts.num_tokens), float(rollouts.ended.sum())], self.world, self.device)
        sample_s = dist.all_max(rollouts.seconds, self.world, self.device)
        row.update({
            "step": step + 1,
            "completion_len": total / len(batch),
            "ended_frac": ended / len(batch),
            "sample_tok_s": total / max(sample_s, 1e-9),
            "train_tok_s": total / max(train_s, 1e-9),
            "sample_s": sample_s,
            "train_s": train_s,
        })
        return row

    def run(self) -> TrainState:
        """Train until ``train.steps``, resuming from the latest checkpoint of this run."""
        self.resume()
        show = self.cfg.progress and sys.stderr.isatty() and self.world.main
        steps_bar = tqdm(total=self.cfg.steps, initial=self.state.step, desc="steps", disable=not show)
        rollouts_bar = tqdm(total=0, desc="rollouts", unit="rollout", disable=not show, leave=False)
        started, first = time.perf_counter(), self.state.step  # this process's steps give the estimate
        try:
            while self.state.step < self.cfg.steps:
                rollouts_bar.reset(total=self.cfg.rollouts_per_step)
                row = self.step(self.state.step, rollouts_bar)
                self.state.step += 1
                self.state.curve.append(row)
                if self.on_step is not None and self.world.main:
                    self.on_step(row)
                steps_bar.update(1)
                figures = {k: row[k] for k in ("loss", "kl", "sft_loss") if k in row}
                steps_bar.set_postfix({k: f"{v:.4f}" for k, v in figures.items()})
                if not show and self.world.main:
                    timing = _timing(started, self.state.step - first, self.cfg.steps - self.state.step)
                    sampled = f" sample={row['sample_tok_s']:.0f} tok/s" if "sample_tok_s" in row else ""
                    self.log(
                        f"step {row['step']}/{self.cfg.steps} " + " ".join(f"{k}={v:.5f}" for k, v in figures.items())
                        + f" len={row['completion_len']:.0f}{sampled} train={row['train_tok_s']:.0f} tok/s{timing}"
                    )
                if self.state.step % self.cfg.checkpoint_every == 0 or self.state.step == self.cfg.steps:
                    self.save_checkpoint()
        finally:
            rollouts_bar.close()
            steps_bar.close()
        return self.state


def _timing(started: float, done: int, remaining: int) -> str:
    """" elapsed N s, about M s left": the mean step time of this process times the steps left."""
    elapsed = time.perf_counter() - started
    left = f", about {elapsed / done * remaining:.0f} s left" if done and remaining else ""
    return f" elapsed {elapsed:.0f} s{left}"
