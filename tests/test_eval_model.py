"""opsd's lm-eval model class (``eval.backend: opsd``) against lm-eval's own ``hf`` model on the tiny model:
the same prompt ids, the same greedy completions (stop strings included), the same log-likelihoods per request
(both cuts of a problem's tokens read from one forward), through real lm-eval runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from opsd_core.backends.capabilities import probe
from opsd_core.config import Params, load_params
from opsd_core.evaluation.harness import load_tasks, make_lm, run_group, task_groups
from opsd_core.evaluation.opsd_lm import OpsdLM, draw_config
from opsd_core.evaluation.tasks import write_task_yamls

ROOT = Path(__file__).resolve().parents[1]
GENERATION = ["opsd_val", "opsd_gsm8k100"]
LOGLIKELIHOOD = ["opsd_val_ll", "opsd_val_answer_ll", "opsd_gsm8k100_ll", "opsd_gsm8k100_answer_ll"]
N_VAL, N_GSM = 5, 4


def _row(i: int) -> dict[str, Any]:
    # problems and solutions of different lengths: batches hold left padding (generation) and right padding
    a, b = 3 + i, 10 * i + 7
    extra = " She counts them twice to be sure." * (i % 3)
    steps = "".join(f"{a} + {j} = {a + j}\n" for j in range(i % 4))
    return {"id": f"q{i}", "problem": f"Ann has {a} pens and gets {b} more.{extra} How many pens now?",
            "solution": f"{steps}{a} + {b} = {a + b}\n#### {a + b}", "answer": str(a + b)}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params, Path]:
    """Eval data, the smoke profile's params (tiny model, greedy) and the generated task folder."""
    root = tmp_path_factory.mktemp("evalmodel")
    for rel, rows in (("data/prepared/val.jsonl", [_row(i) for i in range(N_VAL)]),
                      ("data/eval/gsm8k100.jsonl", [_row(i + 10) for i in range(N_GSM)])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # oneDNN packs on every linear where this CPU has them (the tiny model's are too small for auto's), so the
    # sampler is built as on the default profile's model
    packs = "on" if probe().onednn_fp32 else "auto"
    params = load_params(ROOT / "params.yaml", "smoke", [f"model.cache_dir={root / 'models'}", "eval.device=cpu",
                                                          "eval.limit=5", "eval.batch_size=3",
                                                          f"train.packed_weights={packs}"])
    assert params.eval.temperature == 0 and params.eval.backend == "opsd"
    params = params.model_copy(update={"eval": params.eval.model_copy(update={"tasks": GENERATION + LOGLIKELIHOOD})})
    tasks_dir = root / "tasks"
    write_task_yamls(tasks_dir, root / "data/prepared/val.jsonl", root / "data/eval/gsm8k100.jsonl", params.eval)
    return root, params, tasks_dir


def _candidate(root: Path, params: Params) -> str:
    """A LoRA adapter with non-zero weights, as `opsd train` writes one."""
    from transformers import AutoModelForCausalLM

    from opsd_core.models.lora import wrap_lora
    from opsd_core.models.sources import resolve_base_dir

    out = root / "candidate"
    if not out.is_dir():
        model = wrap_lora(AutoModelForCausalLM.from_pretrained(resolve_base_dir(params.model, root)), params.lora)
        torch.manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
        model.save_pretrained(out)
    return str(out)


def _lm(params: Params, root: Path, backend: str, adapter: str | None = None) -> Any:
    from opsd_core.models.sources import resolve_base_dir
    from opsd_core.stages.evaluate import sampler_factory

    cfg = params.eval.model_copy(update={"backend": backend})
    # the stage's own factory: the trainer's back-end (the decoder engine on a CPU)
    return make_lm(resolve_base_dir(params.model, root), adapter, cfg, "cpu", params.model.thinking,
                   sampler_factory(params, "cpu"))


def _responses(out: dict[str, Any]) -> dict[tuple[str, int], list[Any]]:
    return {(task, ex["doc_id"]): ex["resps"] for task, logged in out["samples"].items() for ex in logged}


def test_opsd_is_registered_with_lm_eval() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("opsd") is OpsdLM


def test_draw_config_is_greedy_unless_sampling_is_asked_for() -> None:
    assert draw_config({"do_sample": False, "temperature": 0.0}, 7).top_k == 1
    assert draw_config({"do_sample": True, "temperature": 0.0}, 7).top_k == 1
    drawn = draw_config({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, 7)
    assert (drawn.temperature, drawn.top_k, drawn.top_p, drawn.max_new_tokens) == (0.7, 0, 0.9, 7)
    with pytest.raises(ValueError, match="repetition_penalty.*eval.backend: hf"):
        draw_config({"do_sample": False, "repetition_penalty": 1.2}, 7)


def test_settings_hash_holds_the_backend(project: tuple[Path, Params, Path]) -> None:
    from opsd_core.stages.evaluate import settings, settings_hash

    root, params, _ = project
    hf = params.model_copy(update={"eval": params.eval.model_copy(update={"backend": "hf"})})
    assert settings(params, root, "cpu")["eval"]["backend"] == "opsd"
    assert settings_hash(settings(hf, root, "cpu")) != settings_hash(settings(params, root, "cpu"))


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "candidate"])
def test_greedy_generation_feeds_the_same_prompt_ids_and_completes_the_same(
        project: tuple[Path, Params, Path], monkeypatch: pytest.MonkeyPatch, with_adapter: bool) -> None:
    """The hf model's generate and opsd's sampler get the same prompt token ids (the chat template as lm-eval
    renders it, left padding stripped) and return the same greedy completions, through lm-eval runs of both own
    generation tasks (5 + 4 problems in batches of 3: padded batches)."""
    from lm_eval.models.huggingface import HFLM

    import opsd_core.evaluation.opsd_lm as opsd_lm

    root, params, tasks_dir = project
    adapter = _candidate(root, params) if with_adapter else None
    fed: dict[str, list[list[int]]] = {"hf": [], "opsd": []}
    hf_generate = HFLM._model_generate

    def spy_generate(self: HFLM, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        fed["hf"].extend(row[m.bool()].tolist() for row, m in zip(context, kwargs["attention_mask"], strict=True))
        return hf_generate(self, context, max_length, stop, **kwargs)

    def spy_sample(module: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        fed["opsd"].extend(prompts)
        return sample(module, prompts, *args, **kwargs)

    sample = opsd_lm.sample
    monkeypatch.setattr(HFLM, "_model_generate", spy_generate)
    monkeypatch.setattr(opsd_lm, "sample", spy_sample)
    outs = {}
    for backend in ("hf", "opsd"):
        lm = _lm(params, root, backend, adapter)
        tm, loaded = load_tasks(GENERATION, tasks_dir)
        outs[backend] = _responses(run_group(lm, list(loaded.values()), tm, params.eval.limit, params.eval))
    assert len(fed["hf"]) == len(fed["opsd"]) == params.eval.limit + N_GSM
    assert sorted(fed["opsd"]) == sorted(fed["hf"])
    assert len({len(p) for p in fed["opsd"]}) > 1  # prompts of several lengths: padding was stripped right
    tok = lm.tokenizer
    from opsd_core.algorithm.prompts import student_messages

    rendered = {tok.apply_chat_template(student_messages(r["problem"]), add_generation_prompt=True, tokenize=False)
                for r in [_row(i) for i in range(N_VAL)] + [_row(i + 10) for i in range(N_GSM)]}
    assert {tok.decode(p) for p in fed["opsd"]} <= rendered
    assert outs["opsd"] == outs["hf"]
    assert sum(len(r[0]) for r in outs["opsd"].values()) > 0  # the tiny model did write something


def test_stop_strings_cut_the_completion_as_the_hf_model_does(project: tuple[Path, Params, Path]) -> None:
    """Stop strings that are ordinary text (not a special token, so the decode runs on past them) cut each
    completion where the hf model cuts it; stop strings taken from the middle of the unstopped completions."""
    from lm_eval.api.instance import Instance

    root, params, _ = project
    lms = {backend: _lm(params, root, backend) for backend in ("hf", "opsd")}
    contexts = [lms["hf"].apply_chat_template([{"role": "user", "content": _row(i)["problem"]}]) for i in range(4)]

    def run(backend: str, until: list[str]) -> list[str]:
        kwargs = {"until": until, "max_gen_toks": 16, "do_sample": False, "temperature": 0.0}
        requests = [Instance("generate_until", {}, (c, dict(kwargs)), 0, ("t", i, 1)) for i, c in enumerate(contexts)]
        return lms[backend].generate_until(requests)

    full = run("hf", [])
    assert run("opsd", []) == full
    stops = [text[len(text) // 2:len(text) // 2 + 2] for text in full if len(text) >= 6]
    assert stops
    cut = run("hf", stops)
    assert cut == run("opsd", stops)
    assert sum(map(len, cut)) < sum(map(len, full))  # the stop strings did cut


def test_loglikelihoods_equal_the_hf_models_from_one_forward_per_problem(
        project: tuple[Path, Params, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request's summed log-probability (and greedy flag) equals the hf model's within 1e-4, the hf model
    running the answer-line tasks apart (its one-cut reading, see harness.py), opsd's running all four tasks in
    one pass with one forward per problem: the whole-solution and answer-line requests share it."""
    root, params, tasks_dir = project
    hf_lm, opsd_lm = _lm(params, root, "hf"), _lm(params, root, "opsd")
    expected: dict[tuple[str, int], list[Any]] = {}
    for _kind, names in task_groups(LOGLIKELIHOOD, "hf"):
        tm, loaded = load_tasks(names, tasks_dir)
        expected |= _responses(run_group(hf_lm, list(loaded.values()), tm, None, params.eval))
    rows: list[int] = []
    call = OpsdLM._model_call

    def counting_call(self: OpsdLM, inps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        rows.append(inps.shape[0])
        return call(self, inps, **kwargs)

    monkeypatch.setattr(OpsdLM, "_model_call", counting_call)
    tm, loaded = load_tasks(LOGLIKELIHOOD, tasks_dir)
    got = _responses(run_group(opsd_lm, list(loaded.values()), tm, None, params.eval))
    assert sum(rows) == N_VAL + N_GSM  # one sequence per problem, not one per request
    assert len(rows) == -(-(N_VAL + N_GSM) // params.eval.batch_size)  # in batches
    assert set(got) == set(expected) and len(got) == 2 * (N_VAL + N_GSM)
    for key, resps in expected.items():
        (ll, greedy), = resps[0]
        (opsd_ll, opsd_greedy), = got[key][0]
        assert opsd_ll == pytest.approx(ll, abs=1e-4), key
        assert opsd_greedy == greedy, key
    # the answer line is a small part of the solution: its log-likelihood is not the whole one's
    for i in range(N_VAL):
        assert abs(got[("opsd_val_answer_ll", i)][0][0][0] - got[("opsd_val_ll", i)][0][0][0]) > 1.0


def test_sampled_draws_are_seeded_per_sample(project: tuple[Path, Params, Path]) -> None:
    """Sampling (temperature > 0): the same seed gives the same completions in another run (base and candidate
    draw the same noise), and a problem's repeats draw different noise."""
    from lm_eval.api.instance import Instance

    root, params, _ = project
    lm = _lm(params, root, "opsd")
    context = lm.apply_chat_template([{"role": "user", "content": _row(0)["problem"]}])
    kwargs = {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0}
    requests = [Instance("generate_until", {}, (context, dict(kwargs)), 0, ("t", 0, 4))] * 4
    first = lm.generate_until(requests)
    assert lm.generate_until(requests) == first
    assert len(set(first)) > 1
