"""Helpers that several test modules share. Test modules import them from here (fixtures from conftest.py,
the smoke projects from projects.py, fault injection from faults/), never from one another.

transformers, peft and opsd's training modules are imported inside the helpers that need them: a test module
that only wants a path or a fabricated report should not pay seconds for a model library.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opsd_core.backends.capabilities import Capabilities
from opsd_core.evaluation.bootstrap import paired_bootstrap

if TYPE_CHECKING:
    from opsd_core.algorithm.rollout import Rollouts
    from opsd_core.algorithm.trainer import OPSDTrainer, Problem
    from opsd_core.config import Params

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)  # the venv's scripts (dvc, mlflow): put on a subprocess's PATH


# -- the opsd command, as separate processes -------------------------------------------------------
def opsd(project: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    """``opsd ARGS`` run in ``project`` (``python -m flows.cli``); a non-zero exit fails the test when ``check``."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=project, env=full_env,
        capture_output=True, text=True, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"opsd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def cli_project(path: Path, cache: Path, extra: str = "") -> Path:
    """A project folder for ``opsd`` commands: this repository's params.yaml on the smoke profile (``extra``
    appended), models cached in ``cache``."""
    path.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "params.yaml").read_text().replace("profile: default", "profile: smoke", 1)
    text = text.replace("cache_dir: .opsd/models", f"cache_dir: {cache}", 1)
    (path / "params.yaml").write_text(text + extra)
    return path


# -- the tiny policy, problems and rollouts of the training tests ----------------------------------
def load_policy(params: Params, lora: bool = True) -> tuple[torch.nn.Module, Any]:
    """The model ``params`` name and its tokenizer, LoRA-wrapped (seeded) or fully trainable."""
    from opsd_core.models.lora import wrap_lora
    from opsd_core.models.sources import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(params.model, ROOT)
    torch.manual_seed(0)
    if lora:
        model = wrap_lora(model, params.lora)
    else:
        model.requires_grad_(True)
    return model, tok


def toy_problems(tok: Any) -> list[Problem]:
    """Four problems of different prompt lengths, each with its verified solution in the teacher's context."""
    from opsd_core.algorithm.prompts import student_prompt_ids, teacher_prompt_ids
    from opsd_core.algorithm.trainer import Problem

    rows = [
        ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7\n#### 7"),
        ("A book costs 12 dollars. What do 5 books cost in dollars, in total?", "5 * 12 = 60\n#### 60"),
        ("Sam ran 2 km.", "#### 2"),
        ("What is 9 times 9? Think about it carefully before you answer.", "9 * 9 = 81\n#### 81"),
    ]
    return [Problem(str(i), student_prompt_ids(tok, p), teacher_prompt_ids(tok, p, s))
            for i, (p, s) in enumerate(rows)]


def fixed_rollouts(tok: Any, n: int, length: int = 6, seed: int = 0) -> Rollouts:
    """``n`` random completions of ``length`` tokens; the first ends early (its tail must be masked)."""
    from opsd_core.algorithm.rollout import Rollouts, completion_mask_from_ids

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (n, length), generator=gen)
    ids[0, 3] = tok.eos_token_id  # one rollout ends early: the tokens after it must be masked
    mask, ended = completion_mask_from_ids(ids, {tok.eos_token_id})
    return Rollouts(ids.masked_fill(~mask, tok.pad_token_id), mask, ended, 1.0)


def train_steps(trainer: OPSDTrainer, rollouts: Rollouts, steps: int) -> None:
    """``steps`` optimizer steps of ``trainer`` on the same ``rollouts`` (no sampling)."""
    for _ in range(steps):
        trainer.accumulate(trainer.problems, rollouts)
        trainer.optimizer_step()


def random_model(kind: str) -> torch.nn.Module:
    """A 2-layer model of one architecture, random weights (no download: built from a config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"qwen2": {"use_sliding_window": False}, "qwen3": {"head_dim": 16, "use_sliding_window": False}}
    cfg = AutoConfig.for_model(kind, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=False, **extra.get(kind, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if kind == "qwen2":  # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


# -- machines users have, written down (capabilities without probing) ------------------------------
_X86 = dict(machine="x86_64", system="Linux", mallopt=True, cuda=False, cuda_bf16=False, mps=False)
AVX2 = Capabilities(torch_cpu="AVX2", flags=("avx", "avx2", "fma", "f16c"), onednn_fp32=True, onednn_bf16=False,
                    bf16_units=False, **_X86)
SKYLAKE = Capabilities(torch_cpu="AVX512", flags=("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
                       onednn_fp32=True, onednn_bf16=True, bf16_units=False, **_X86)
SAPPHIRE = Capabilities(torch_cpu="AVX512", flags=("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                   "avx512_bf16", "amx_bf16"),
                        onednn_fp32=True, onednn_bf16=True, bf16_units=True, **_X86)
GRAVITON3 = Capabilities(machine="aarch64", system="Linux", torch_cpu="SVE256", flags=("asimd", "bf16", "sve"),
                         onednn_fp32=True, onednn_bf16=True, bf16_units=True, mallopt=True, cuda=False,
                         cuda_bf16=False, mps=False, pack_speedup=1.4)
APPLE = Capabilities(machine="arm64", system="Darwin", torch_cpu="DEFAULT", flags=("asimd", "bf16"), onednn_fp32=False,
                     onednn_bf16=False, bf16_units=True, mallopt=False, cuda=False, cuda_bf16=False, mps=True)
NO_ONEDNN = replace(AVX2, onednn_fp32=False)
H100 = replace(SAPPHIRE, cuda=True, cuda_bf16=True, cuda_name="NVIDIA H100")
T4 = replace(AVX2, cuda=True, cuda_bf16=False, cuda_name="Tesla T4")


# -- fabricated evaluation reports -----------------------------------------------------------------
DOCS = [f"d{i:02d}" for i in range(40)]
PRIMARY, GUARD = "opsd_val", "opsd_gsm8k100"


def _samples(ones: int) -> dict[str, list[int]]:
    # nested sets: a model with more ones is at least as good on every doc, so the pairing matters
    return {d: [int(i < ones)] for i, d in enumerate(DOCS)}


def _side(ones: int) -> dict[str, Any]:
    return {"score": ones / len(DOCS), "n": len(DOCS), "samples": _samples(ones)}


def _task(base: int, cand: int) -> dict[str, Any]:
    b, c = _side(base), _side(cand)
    keys = sorted(b["samples"])
    diff = paired_bootstrap([b["samples"][k][0] for k in keys], [c["samples"][k][0] for k in keys], 1000, 0)
    return {"base": b, "candidate": c, "diff": diff}


def eval_report(cand: int, base: int = 10, guard: tuple[int, int] = (20, 20), settings: str = "s1") -> dict:
    """An ``eval.json`` with the primary task (``cand`` and ``base`` right of 40) and the guard task."""
    return {"settings": {"settings_hash": settings},
            "tasks": {PRIMARY: _task(base, cand), GUARD: _task(*guard)}}


# -- a run lease held by another process -----------------------------------------------------------
HOLD_AND_DIE = """
import os, signal, sys
from pathlib import Path
from opsd_core.registry import leases
lease = leases.hold(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
lease.release()
"""


def hold_lease(state: Path, run_id: str, how: str) -> subprocess.CompletedProcess[str]:
    """A process that takes the lease of ``run_id`` under ``state``, then dies (``how="die"``: SIGKILL) or
    releases it (``"finish"``)."""
    return subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(state), run_id, how], capture_output=True,
                          text=True, timeout=120)


# -- a registered-candidate project and a real MLflow server (the registry tests) ------------------
PROBE = torch.tensor([[1, 5, 9, 13, 17, 21]])


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s logits on :data:`PROBE` (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def make_candidate(out: Path, base_dir: Path, seed: int) -> torch.Tensor:
    """Write a LoRA adapter with non-zero B weights; returns its logits on PROBE."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    model.save_pretrained(out)
    weights = (out / "adapter_model.safetensors").read_bytes()
    meta = {"base_model": "tiny", "base_path": str(base_dir), "adapter": True, "params_hash": "p" * 16,
            "data_hash": "d" * 16, "content_hash": hashlib.sha256(weights).hexdigest(), "steps": 3}
    (out / "opsd_candidate.json").write_text(json.dumps(meta))
    return probe_logits(model)


def registry_project(root: Path, base_dir: Path, seed: int, report: dict) -> torch.Tensor:
    """``root`` as the train and evaluate stages leave it (``report`` as eval.json, a LoRA candidate on
    ``base_dir`` seeded by ``seed``), ready for ``register``; returns the candidate's logits on PROBE."""
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "eval.json").write_text(json.dumps(report))
    diagnosis = {"problems": 16, "accuracy_gap": 0.55, "answer_ll_gap": 1.25, "reading": "room for OPSD"}
    (reports / "train.json").write_text(json.dumps({"final_loss": 0.5, "steps": 3, "device": "cpu",
                                                    "diagnosis": diagnosis}))
    (reports / "data.json").write_text(json.dumps({"data_hash": "d" * 16}))
    (reports / "train_curve.csv").write_text(
        "step,loss,kl,clipped_frac,completion_len,ended_frac,sample_tok_s,train_tok_s,lr,grad_norm\n"
        "1,0.9,0.9,0.1,12,0.5,100,200,1e-4,1.0\n2,0.7,0.7,0.05,11,0.75,100,200,9e-5,0.8\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "raw.dvc").write_text("outs:\n- md5: abc123.dir\n  path: raw\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    return make_candidate(root / "models" / "candidate", base_dir, seed)


def tiny_llama(path: Path) -> Path:
    """A 2-layer Llama of random weights (seed 0) saved at ``path``: the base the registry tests' adapters sit on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# `flows.ingest.ingest_and_track` in a process of its own; a project error as one line on stderr, exit 1
INGEST_CALLER = """
import json, sys
from pathlib import Path
from flows.ingest import ingest_and_track
from opsd_core.config import Params
from opsd_core.errors import OpsdError
try:
    print(json.dumps(ingest_and_track(Params(), Path(sys.argv[1]))))
except OpsdError as err:
    print(str(err).splitlines()[0], file=sys.stderr)
    sys.exit(1)
"""
