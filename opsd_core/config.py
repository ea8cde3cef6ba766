"""Typed configuration: ``params.yaml`` → validated :class:`Params`.

``params.yaml`` holds the default profile at the top level and named partial overrides under
``profiles:``. The active profile is ``--profile`` if given, else the file's ``profile:`` key, else
``default``. ``--set section.key=value`` overrides are applied last (values parsed as YAML).
Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opsd_core.errors import SettingError
from opsd_core.io import json_hash


class ConfigError(SettingError):
    """A configuration problem, with the offending key in the message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateConfig(_Section):
    """``opsd data generate``: the bundled raw dataset."""

    # gsm_symbolic: reasoning-gym's GSM8K-style problems; arithmetic: multi-step word problems within a
    # small model's reach (opsd_core/data/arithmetic.py), their difficulty set by the three keys below
    source: Literal["gsm_symbolic", "arithmetic"] = "gsm_symbolic"
    size: int = Field(300, ge=1)
    seed: int = 42
    output: str = "data/raw/gsm_symbolic.jsonl"
    steps: int = Field(2, ge=1)          # arithmetic: operations per problem
    max_number: int = Field(50, ge=2)    # arithmetic: the largest number drawn
    distractors: int = Field(0, ge=0)    # arithmetic: sentences with numbers that do not enter the answer


class DataConfig(_Section):
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    eval_dir: str = "data/eval"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_problem_tokens: int = Field(384, ge=1)
    max_solution_tokens: int = Field(1024, ge=1)
    contamination_ngram: int = Field(13, ge=1)
    max_train_rows: int | None = Field(None, ge=1)
    generate: GenerateConfig = GenerateConfig()


class TinyModelConfig(_Section):
    """The config-built model used by tests and the smoke profile."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(128, ge=8)
    vocab: int = Field(512, ge=300)
    seed: int = 0


class ModelConfig(_Section):
    # "bundled:smollm2-135m-instruct" | "tiny" | local dir | *.gguf file | hub id
    base: str = "bundled:smollm2-135m-instruct"
    cache_dir: str = ".opsd/models"
    trust_remote_code: bool = False
    revision: str | None = None
    # chat templates with a thinking switch (Qwen3): passed as enable_thinking to the template, for the
    # student, the teacher and lm-eval alike; null: the template's own default (Qwen3: thinking on)
    thinking: bool | None = None
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]


class SamplingConfig(_Section):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.1, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # no end-of-sequence before this many tokens (benchmarks use it for fixed-length rollouts)
    min_new_tokens: int = Field(0, ge=0)
    # engine: opsd_core.backends.engine on a merged copy of the policy (Llama-family models; others fall back
    # to generate); generate: transformers generate; static: transformers generate with its static KV cache
    # on a merged copy (compiled by transformers on a GPU); auto: engine on a CPU (measured 2.8x the compiled
    # static cache there), static on CUDA (the issue-12 measurement: 6.5x the engine at 16 rollouts),
    # generate elsewhere (opsd_core/backends/plan.py)
    backend: Literal["auto", "engine", "generate", "static"] = "auto"

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"opsd.sampling.min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        return self


class OPSDConfig(_Section):
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)
    support: Literal["full", "topk", "sampled"] = "full"
    topk: int = Field(20, ge=1)
    clip: Literal["none", "pointwise", "token"] = "pointwise"
    clip_value: float = Field(0.05, gt=0)
    # None: use the sampling temperature (DESIGN.md section 5.4)
    temperature: float | None = Field(None, gt=0)
    teacher: Literal["fixed", "ema", "live"] = "fixed"
    # what privileged context the teacher sees: reference (the problem's verified solution), shuffled
    # (another problem's solution: the control), none (the student's prompt: no privileged context)
    teacher_context: Literal["reference", "shuffled", "none"] = "reference"
    # the teacher's instruction between the reference solution and the answer instruction
    # (null: opsd_core/algorithm/prompts.TEACHER_INSTRUCTION; "": none)
    teacher_instruction: str | None = None
    # fixed teacher only: score with a frozen copy of the base in this dtype through the decoder
    # engine, without padding (None: the policy with its adapter disabled, no copy). bfloat16 makes
    # the teacher pass ~1.5x faster on CPUs with bf16 units (benchmarks.breakdown, oneDNN packs on), at bf16 precision.
    teacher_dtype: Literal["float32", "bfloat16"] | None = None
    ema_decay: float = Field(0.99, gt=0, lt=1)
    chunk_size: int = Field(128, ge=1)
    # shuffled: the contrastive target (algorithm/losses.contrastive_teacher_logits): the student is pulled only
    # where the teacher with the problem's own solution differs from the teacher with another problem's
    # (the privileged context's style drift, seen in the shuffled control, cancels); costs one more teacher
    # pass. contrast_weight: the power of that ratio; contrast_plausibility: tokens the right teacher gives
    # less than this fraction of its top probability are never raised by the ratio (0: no limit)
    contrast: Literal["none", "shuffled"] = "none"
    contrast_weight: float = Field(1.0, gt=0)
    contrast_plausibility: float = Field(0.1, ge=0, lt=1)
    # training problems on which `opsd train` measures the self-teacher gap before its first step
    # (opsd_core/algorithm/diagnose.py; `opsd diagnose` alone); 0: not measured
    diagnose_problems: int = Field(16, ge=0)
    sampling: SamplingConfig = SamplingConfig()


    def advice(self) -> list[str]:
        """Valid but doubtful combinations, printed when training starts."""
        out = []
        if self.support == "sampled" and self.clip == "pointwise":
            out.append(f"opsd.support=sampled with opsd.clip=pointwise ({self.clip_value}) clips the sampled token's "
                       "log-ratio itself: measured ~90 % of tokens clipped at 0.05, an expected gradient at cosine "
                       "0.84 to the unclipped one; consider opsd.clip: none or token")
        return out

    @model_validator(mode="after")
    def _teacher_dtype_needs_fixed(self) -> OPSDConfig:
        if self.teacher_dtype is not None and self.teacher != "fixed":
            raise ValueError(
                f"opsd.teacher_dtype applies to the fixed teacher only (opsd.teacher is {self.teacher!r})"
            )
        return self


class TrainConfig(_Section):
    # opsd: on-policy self-distillation; sft: the verified solutions' likelihood behind the student's prompt
    # (no rollouts: the baseline OPSD must beat, and the model an OPSD retrain can start from); mix:
    # (1 - mix_weight) * opsd + mix_weight * sft on the same problems each step
    objective: Literal["opsd", "sft", "mix"] = "opsd"
    mix_weight: float = Field(0.5, ge=0, le=1)
    steps: int = Field(8, ge=1)
    rollouts_per_step: int = Field(4, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(1, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(4, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_dir: str = ".opsd/checkpoints"
    output_dir: str = "models/candidate"
    reports_dir: str = "reports"
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    # auto: CUDA when there is one, else the CPU (MPS is opt-in: not yet validated)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # data-parallel processes (opsd_core/backends/distributed.py): above 1, `opsd train` relaunches itself under
    # torchrun (gloo on CPUs, one GPU per process with CUDA); a run resumes with any number
    nproc: int = Field(1, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # CPU only: frozen linears (LoRA base layers, fixed teacher, sampler copy) through oneDNN with
    # pre-packed weights (opsd_core/backends/packs.py), plain LoRA layers as one fused node; costs one more copy
    # of the frozen weights. auto: on where oneDNN packs run and pay (opsd_core/backends/plan.py), for matrices
    # of 2^17+ elements; on: every size (an error where oneDNN cannot); off: F.linear and peft's forward.
    # YAML reads a bare on/off as true/false: both spellings are accepted.
    packed_weights: Literal["auto", "on", "off"] = "auto"
    # packed CPU path only: the products with frozen weights (the student's base layers, the fixed
    # teacher) run in this dtype, like autocast for those layers: weights rounded once, inputs on the
    # way in, results back in `precision`; LoRA weights, their gradients, the residual stream, the loss
    # and the optimizer stay in `precision`. bfloat16: 2-3x faster products on CPUs with bf16 units;
    # an error where oneDNN cannot pack bf16 (AVX2-only and most arm64 CPUs). null: the training precision.
    frozen_dtype: Literal["bfloat16"] | None = None
    # CPU only: keep activation-sized blocks in glibc's heap instead of fresh mmap pages per tensor
    # (opsd_core/backends/runtime.py; ~20% of the student pass on a VM). auto: tuned where glibc has mallopt;
    # tuned: an error where it has not; default: leave malloc alone
    cpu_allocator: Literal["auto", "tuned", "default"] = "auto"
    progress: bool = True

    @field_validator("packed_weights", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 turns a bare on/off (and yes/no, true/false) into booleans
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        if self.rollouts_per_step % self.micro_batch_size:
            raise ValueError(
                f"train.rollouts_per_step ({self.rollouts_per_step}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class EvalConfig(_Section):
    tasks: list[str] = ["opsd_val", "opsd_gsm8k100"]
    extra_tasks: list[str] = []  # standard lm-eval tasks, e.g. gsm8k (need their data)
    samples_per_problem: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    limit: int | None = Field(None, ge=1)
    # problems per log-likelihood task (*_ll: one forward each, no generation); null: every problem
    ll_limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    # opsd: lm-eval's model class of our own (evaluation/opsd_lm.py: generation through the training sampler,
    # one forward per solution for both log-likelihood cuts); hf: lm-eval's own hf model, as before
    backend: Literal["opsd", "hf"] = "opsd"


class RegistryConfig(_Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in state_dir
    experiment: str = "opsd"
    model_name: str = "opsd-model"
    state_dir: str = ".opsd"
    primary_task: str = "opsd_val"
    margin: float = Field(0.0, ge=0)
    guard_tasks: dict[str, float] = {"opsd_gsm8k100": 0.05}


class FlowConfig(_Section):
    source_dir: str = "incoming"
    dvc_remote: str | None = None
    work_pool: str | None = None
    # where a work pool's workers get the project: a git URL each run clones (workers on other machines);
    # null: this folder (a worker on this machine)
    source: str | None = None
    source_branch: str | None = None
    concurrency_limit: int = Field(1, ge=1)
    concurrency_tag: str = "opsd-train"
    train_retries: int = Field(1, ge=0)


class Params(_Section):
    profile: str = "default"
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    opsd: OPSDConfig = OPSDConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    flow: FlowConfig = FlowConfig()

    def hash(self) -> str:
        """Content hash of the resolved configuration (stable across key order)."""
        return json_hash(self.model_dump(mode="json"))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set: bad key {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {dotted}: value {raw!r} is not valid YAML: {err}") from err
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _format_validation(err: ValidationError, source: str, overridden: set[str] = frozenset()) -> str:
    """One line per problem; a key that came from ``--set`` says so instead of blaming the file."""
    lines = [f"invalid configuration in {source}" + (" and --set" if overridden else "") + ":"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        origin = " (from --set)" if any(key == o or key.startswith(o + ".") for o in overridden) else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{origin}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r}){origin}")
    return "\n".join(lines)


def resolve_tree(
    raw: dict[str, Any], profile: str | None = None, overrides: list[str] | None = None,
    source: str = "params",
) -> dict[str, Any]:
    """Merge the base tree, the chosen profile and ``--set`` overrides into one plain dict."""
    raw = dict(raw or {})
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: 'profiles' must be a mapping of name -> overrides")
    name = profile or raw.get("profile") or "default"
    tree = raw
    if name != "default":
        if name not in profiles:
            known = ", ".join(["default", *sorted(profiles)])
            raise ConfigError(f"{source}: unknown profile {name!r} (known: {known})")
        tree = _deep_merge(tree, profiles[name] or {})
    tree["profile"] = name
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    return tree


def load_params(
    path: str | Path | None = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Params:
    """Load and validate ``params.yaml`` (missing file: built-in defaults)."""
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    elif path is not None and Path(path).name != "params.yaml":
        raise ConfigError(f"params file not found: {path}")
    tree = resolve_tree(raw, profile, overrides, source)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        overridden = {a.split("=", 1)[0].strip() for a in overrides or [] if "=" in a}
        raise ConfigError(_format_validation(err, source, overridden)) from None
