"""Evaluation stage: generated lm-eval tasks, offline runs on the tiny model, paired bootstrap."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from opsd_core.algorithm.prompts import ANSWER_INSTRUCTION, student_messages
from opsd_core.config import EvalConfig, ModelConfig, Params
from opsd_core.data.verify import last_number
from opsd_core.evaluation.bootstrap import paired_bootstrap
from opsd_core.evaluation.errors import EvalDataError, EvalTaskError
from opsd_core.evaluation.metrics import (
    doc_to_text,
    flexible_correctness,
    process_results,
    sample_correctness,
)
from opsd_core.evaluation.tasks import SAMPLES_FILTER, answer_split, write_task_yamls

K = 2
LIMIT = 3


def _row(i: int, meta: dict[str, Any]) -> dict[str, Any]:
    a, b = 3 + i, 10 * i + 7
    return {
        "id": f"q{i}", "problem": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "solution": f"{a} + {b} = {a + b}\n#### {a + b}", "answer": str(a + b), "source": "test", "meta": meta,
    }


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """A tiny project root: prepared val split, GSM8K set (rows with differing meta schemas), params."""
    root = tmp_path_factory.mktemp("evalroot")
    # meta objects differ in keys and types between rows on purpose (datasets infers one schema)
    _write_rows(root / "data/prepared/val.jsonl", [_row(i, {"k": i} if i % 2 else {"s": "x"}) for i in range(5)])
    _write_rows(root / "data/eval/gsm8k100.jsonl", [_row(i + 10, {}) for i in range(4)])
    params = Params(
        model=ModelConfig(base="tiny", cache_dir=str(root / ".opsd/models")),
        eval=EvalConfig(samples_per_problem=K, temperature=0.8, max_new_tokens=12, limit=LIMIT,
                        batch_size=4, bootstrap_samples=200, device="cpu"),
    )
    return root, params


# -- scoring functions lm-eval calls -----------------------------------------------------------
def test_process_results_scores_correct_one_and_wrong_zero() -> None:
    doc = {"id": "x", "problem": "p", "answer": "18"}
    assert process_results(doc, [["steps...\n#### 18"]])["exact_match"] == 1.0
    assert process_results(doc, [["steps...\n#### 17"]])["exact_match"] == 0.0
    assert process_results(doc, [["no final answer here"]]) == {"exact_match": 0.0, "exact_match_flex": 0.0,
                                                                 "has_answer": 0.0}
    # avg@k: the mean over the problem's samples; "18.00" and a boxed answer count as 18
    got = process_results(doc, [["#### 18.00", "#### 3", "so \\boxed{18}", "#### 1"]])
    assert got["exact_match"] == pytest.approx(0.5)
    assert got["has_answer"] == pytest.approx(1.0)
    assert sample_correctness(doc, ["#### 18", "#### 19"]) == [1, 0]


def test_flexible_match_takes_the_last_number_without_the_answer_format() -> None:
    doc = {"id": "x", "problem": "p", "answer": "1250"}
    completions = ["so the total is 1,250 dollars.", "3 + 4 = 7, then 1250", "#### 1250", "1250 is wrong: 12",
                   "no number", "1250.0"]
    assert flexible_correctness(doc, completions) == [1, 1, 1, 0, 0, 1]
    assert sample_correctness(doc, completions) == [0, 0, 1, 0, 0, 0]  # strict wants "####" or \\boxed
    got = process_results(doc, [completions])
    assert got["exact_match_flex"] == pytest.approx(4 / 6) and got["exact_match"] == pytest.approx(1 / 6)
    assert last_number("x = -3.5, y") == "-3.5" and last_number("none") is None


def test_answer_split_cuts_before_the_final_answer_line() -> None:
    assert answer_split("a = 1\nb = 2\n#### 3") == ("a = 1\nb = 2\n", "#### 3")
    assert answer_split("#### 3") == ("", "#### 3")
    assert answer_split("x\nso \\boxed{4}.") == ("x\n", "so \\boxed{4}.")
    assert answer_split("#### 1\ncheck: #### 2") == ("#### 1\n", "check: #### 2")  # the last one
    with pytest.raises(ValueError, match="no final answer line"):
        answer_split("no answer")


def test_doc_to_text_is_the_student_user_message() -> None:
    doc = {"problem": "  What is 2 + 2?  ", "answer": "4"}
    text = doc_to_text(doc)
    assert text == student_messages(doc["problem"])[0]["content"]
    assert text == "What is 2 + 2?\n\n" + ANSWER_INSTRUCTION


# -- YAML generation ---------------------------------------------------------------------------
def test_write_task_yamls_generates_loadable_tasks(project: tuple[Path, Params], tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    root, params = project
    cfg = params.eval
    names = write_task_yamls(tmp_path, root / "data/prepared/val.jsonl", root / "data/eval/gsm8k100.jsonl", cfg)
    assert names == ["opsd_val", "opsd_gsm8k100"]
    text = (tmp_path / "opsd_val.yaml").read_text()
    assert re.search(r"process_results: !function '?opsd_core\.evaluation\.metrics\.process_results", text)
    conf = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
    assert conf["output_type"] == "generate_until"
    assert conf["repeats"] == K
    assert conf["generation_kwargs"] == {"until": ["<|im_end|>"], "max_gen_toks": 12, "do_sample": True,
                                         "temperature": 0.8}
    assert conf["filter_list"][0]["filter"] == [{"function": "take_first_k", "k": K}]
    data_file = Path(conf["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.is_file()
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(5)]
    assert all(set(r) == {"id", "problem", "answer"} for r in rows)

    greedy = write_task_yamls(tmp_path / "greedy", root / "data/prepared/val.jsonl",
                              root / "data/eval/gsm8k100.jsonl", cfg.model_copy(update={"temperature": 0.0}))
    assert greedy == names
    gconf = yaml.load((tmp_path / "greedy/opsd_val.yaml").read_text().replace("!function", ""),
                      Loader=yaml.SafeLoader)
    assert gconf["generation_kwargs"]["do_sample"] is False

    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["opsd_val"])["tasks"]["opsd_val"]
    docs = list(task.test_docs())
    assert len(docs) == 5 and docs[0]["answer"] == "10"
    assert task.doc_to_text(docs[0]) == student_messages(docs[0]["problem"])[0]["content"]


def test_write_task_yamls_errors_name_the_task(project: tuple[Path, Params], tmp_path: Path) -> None:
    root, params = project
    gsm = root / "data/eval/gsm8k100.jsonl"
    with pytest.raises(EvalDataError, match="opsd_val.*does not exist"):
        write_task_yamls(tmp_path, tmp_path / "missing.jsonl", gsm, params.eval)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvalDataError, match="opsd_val.*no rows"):
        write_task_yamls(tmp_path, empty, gsm, params.eval)
    with pytest.raises(EvalTaskError, match="gsm8k.*extra_tasks"):
        write_task_yamls(tmp_path, gsm, gsm, params.eval.model_copy(update={"tasks": ["gsm8k"]}))


# -- paired bootstrap --------------------------------------------------------------------------
def test_bootstrap_identical_scores_give_zero_difference() -> None:
    scores = [0.0, 1.0, 0.5, 1.0, 0.0, 0.25]
    out = paired_bootstrap(scores, list(scores), n=500, seed=0)
    assert out["mean_diff"] == 0.0
    assert out["ci_low"] <= 0.0 <= out["ci_high"]
    assert out["p_better"] == 0.0


def test_bootstrap_clearly_better_candidate_has_positive_lower_bound() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, size=60).astype(float)
    cand = np.maximum(base, rng.integers(0, 2, size=60))  # never worse, often better
    out = paired_bootstrap(base.tolist(), cand.tolist(), n=1000, seed=3)
    assert out["mean_diff"] == pytest.approx(cand.mean() - base.mean())
    assert out["ci_low"] > 0.0
    assert out["ci_low"] <= out["mean_diff"] <= out["ci_high"]
    assert out["p_better"] > 0.99
    worse = paired_bootstrap(cand.tolist(), base.tolist(), n=1000, seed=3)
    assert worse["ci_high"] < 0.0


def test_bootstrap_deterministic_under_seed_and_validates_input() -> None:
    rng = np.random.default_rng(2)
    base, cand = rng.random(40).tolist(), rng.random(40).tolist()
    assert paired_bootstrap(base, cand, n=300, seed=7) == paired_bootstrap(base, cand, n=300, seed=7)
    assert paired_bootstrap(base, cand, n=300, seed=7) != paired_bootstrap(base, cand, n=300, seed=8)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0], n=10, seed=0)
    with pytest.raises(ValueError):
        paired_bootstrap([], [], n=10, seed=0)


# -- offline lm-eval runs on the tiny model ----------------------------------------------------
def _make_candidate(root: Path, params: Params) -> None:
    """A base + LoRA candidate as `opsd train` writes it, with non-zero adapter weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd_core.models.lora import wrap_lora
    from opsd_core.models.sources import resolve_base_dir

    base_dir = resolve_base_dir(params.model, root)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = wrap_lora(model, params.lora)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the model
                p.normal_(0.0, 0.5)
    out = root / params.train.output_dir
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    (out / "opsd_candidate.json").write_text(json.dumps(
        {"base_model": params.model.base, "base_path": str(base_dir), "adapter": True, "content_hash": "t"}))


@pytest.fixture(scope="module")
def reports(project: tuple[Path, Params]) -> tuple[dict[str, Any], dict[str, Any]]:
    from opsd_core.stages.evaluate import evaluate_base, evaluate_candidate

    root, params = project
    base = evaluate_base(params, root)
    _make_candidate(root, params)
    return base, evaluate_candidate(params, root)


def _check_model_result(res: dict[str, Any]) -> None:
    assert res["n"] == LIMIT and res["k"] == K
    assert len(res["samples"]) == LIMIT
    for values in res["samples"].values():
        assert len(values) == K and set(values) <= {0.0, 1.0}
    per_problem = [sum(v) / K for v in res["samples"].values()]
    assert res["score"] == pytest.approx(sum(per_problem) / LIMIT)
    # our per-sample rescoring agrees with lm-eval's own aggregate of process_results
    assert res["score"] == pytest.approx(res["lm_eval"][res["metric"]])


def test_base_and_candidate_report_is_well_formed(
    project: tuple[Path, Params], reports: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    root, params = project
    base_report, report = reports
    assert json.loads((root / "reports/eval_base.json").read_text()) == base_report
    assert json.loads((root / "reports/eval.json").read_text()) == report
    assert report["settings"]["settings_hash"] == base_report["settings"]["settings_hash"]
    assert report["base_source"] == "cache"
    assert report["models"]["candidate"]["adapter"] == params.train.output_dir
    assert set(report["tasks"]) == {"opsd_val", "opsd_gsm8k100", "opsd_val_flex", "opsd_gsm8k100_flex"}
    for name in ("opsd_val", "opsd_gsm8k100"):  # the flexible entry rescored the strict one's completions
        strict, flex = report["tasks"][name]["candidate"], report["tasks"][name + "_flex"]["candidate"]
        assert flex["metric"] == f"exact_match_flex,{SAMPLES_FILTER}" and set(flex["samples"]) == set(strict["samples"])
        assert flex["score"] == pytest.approx(strict["lm_eval"][f"exact_match_flex,{SAMPLES_FILTER}"])
    for name, entry in report["tasks"].items():
        assert entry["base"] == base_report["tasks"][name]
        _check_model_result(entry["base"])
        _check_model_result(entry["candidate"])
        assert set(entry["base"]["samples"]) == set(entry["candidate"]["samples"])
        diff = entry["diff"]
        assert diff["mean_diff"] == pytest.approx(entry["candidate"]["score"] - entry["base"]["score"])
        assert diff["ci_low"] <= diff["mean_diff"] <= diff["ci_high"]
        assert diff["n_problems"] == LIMIT and diff["n_resamples"] == params.eval.bootstrap_samples


def test_rendered_prompt_is_the_chat_template(
    project: tuple[Path, Params], reports: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    from transformers import AutoTokenizer

    from opsd_core.models.sources import resolve_base_dir

    root, params = project
    tok = AutoTokenizer.from_pretrained(resolve_base_dir(params.model, root))
    for entry in reports[1]["tasks"].values():
        for side in ("base", "candidate"):
            ex = entry[side]["example"]
            expected = tok.apply_chat_template(student_messages(ex["problem"]), add_generation_prompt=True,
                                               tokenize=False)
            assert ex["prompt"] == expected


def test_candidate_is_evaluated_with_its_adapter(reports: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # same seed, same prompt: only the adapter can make the first sampled completion differ
    for entry in reports[1]["tasks"].values():
        assert entry["base"]["example"]["id"] == entry["candidate"]["example"]["id"]
        assert entry["base"]["example"]["completion"] != entry["candidate"]["example"]["completion"]


def test_settings_hash_changes_with_the_settings_and_only_with_them(project: tuple[Path, Params], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from opsd_core.stages.evaluate import settings, settings_hash

    root, params = project
    digest = settings_hash(settings(params, root, "cpu"))

    def reordered(tree: Any) -> Any:  # the same settings with every mapping's keys in reverse order
        return {key: reordered(tree[key]) for key in reversed(tree)} if isinstance(tree, dict) else tree

    assert list(reordered(settings(params, root, "cpu"))) != list(settings(params, root, "cpu"))
    assert settings_hash(reordered(settings(params, root, "cpu"))) == digest
    # built independently: params from their values, the eval data copied to another project folder
    copy = tmp_path / "elsewhere"
    for rel in ("data/prepared/val.jsonl", "data/eval/gsm8k100.jsonl"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((root / rel).read_bytes())
    rebuilt = Params.model_validate(json.loads(params.model_dump_json()))
    assert settings_hash(settings(rebuilt, copy, "cpu")) == digest
    # the bootstrap only affects the comparison, not either model's scores
    more_resamples = params.model_copy(update={"eval": params.eval.model_copy(update={"bootstrap_samples": 999})})
    assert settings_hash(settings(more_resamples, root, "cpu")) == digest

    shorter = params.model_copy(update={"eval": params.eval.model_copy(update={"max_new_tokens": 13})})
    assert settings_hash(settings(shorter, root, "cpu")) != digest
    assert settings_hash(settings(params, root, "cuda")) != digest
    # another opsd scoring (a harness change) re-evaluates the cached base too
    monkeypatch.setattr("opsd_core.stages.evaluate.SCORING_VERSION", -1)
    assert settings_hash(settings(params, root, "cpu")) != digest
    monkeypatch.undo()
    rows = (copy / "data/prepared/val.jsonl").read_text().splitlines()
    (copy / "data/prepared/val.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # one problem fewer
    assert settings_hash(settings(params, copy, "cpu")) != digest


def test_a_stale_base_cache_is_re_evaluated(project: tuple[Path, Params],
                                             reports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    """A cached base report written under other settings, or lacking a task, is evaluated again, never reused
    (the matching cache is reused: test_base_and_candidate_report_is_well_formed)."""
    import shutil

    from opsd_core.stages.evaluate import evaluate_candidate

    root, params = project

    def other_settings(report: dict[str, Any]) -> None:
        report["settings"]["settings_hash"] = "0" * 16

    def missing_task(report: dict[str, Any]) -> None:
        del report["tasks"]["opsd_gsm8k100"]

    for stale in (other_settings, missing_task):
        copy = tmp_path / stale.__name__
        for rel in ("data", params.train.output_dir):
            shutil.copytree(root / rel, copy / rel)
        base_report = json.loads(json.dumps(reports[0]))
        stale(base_report)
        for entry in base_report["tasks"].values():
            entry["score"] = -1.0  # a cached value no real run gives
        (copy / "reports").mkdir()
        (copy / "reports/eval_base.json").write_text(json.dumps(base_report))
        report = evaluate_candidate(params, copy)
        assert report["base_source"] == "evaluated", stale.__name__
        assert report["settings"]["settings_hash"] == reports[0]["settings"]["settings_hash"]
        for name, entry in report["tasks"].items():  # the same seeded run as the cached base: the same results
            assert entry["base"] == reports[0]["tasks"][name], (stale.__name__, name)


def test_standard_task_without_data_is_a_clear_error(project: tuple[Path, Params]) -> None:
    from opsd_core.evaluation.harness import evaluate_model
    from opsd_core.stages.evaluate import settings, settings_hash

    root, params = project
    tasks_dir = root / ".opsd/eval_tasks" / settings_hash(settings(params, root, "cpu"))
    write_task_yamls(tasks_dir, root / "data/prepared/val.jsonl", root / "data/eval/gsm8k100.jsonl", params.eval)
    with pytest.raises(EvalDataError, match=r"task 'gsm8k'.*not available"):
        evaluate_model("unused-model-dir", None, ["opsd_val", "gsm8k"], params.eval, tasks_dir)
    with pytest.raises(EvalTaskError, match=r"unknown lm-eval task 'gsm8k_typo_task'"):
        evaluate_model("unused-model-dir", None, ["gsm8k_typo_task"], params.eval, tasks_dir)


def test_loglikelihood_task_scores_the_reference_behind_exactly_the_student_prompt(
        project: tuple[Path, Params], tmp_path: Path) -> None:
    """opsd_val_ll through a real lm-eval run equals the student's log-probability of the verified solution
    computed directly (transformers, the training prompt ids), per solution token, problem by problem. lm-eval
    also scores the template's last token (the newline it moves out of the context; see ll_task_config)."""
    from opsd_core.algorithm.prompts import student_prompt_ids
    from opsd_core.evaluation.harness import LL_PER_TOKEN, evaluate_model
    from opsd_core.models.sources import load_model_and_tokenizer, resolve_base_dir

    root, params = project
    cfg = params.eval.model_copy(update={"tasks": ["opsd_val_ll", "opsd_val"]})
    write_task_yamls(tmp_path, root / "data/prepared/val.jsonl", root / "data/eval/gsm8k100.jsonl", cfg)
    config = yaml.safe_load((tmp_path / "opsd_val_ll.yaml").read_text().replace("!function", ""))
    assert config["output_type"] == "loglikelihood" and config["target_delimiter"] == ""
    base = resolve_base_dir(params.model, root)
    tasks = evaluate_model(str(base), None, ["opsd_val_ll", "opsd_val"], cfg, tmp_path).tasks
    result = tasks["opsd_val_ll"]
    # eval.limit (3) bounds the generation tasks only; eval.ll_limit (null) lets every val problem (5) count
    assert tasks["opsd_val"].n == LIMIT and result.metric == LL_PER_TOKEN and result.n == 5 and result.k == 1
    model, tok = load_model_and_tokenizer(params.model, root)
    rows = {r["id"]: r for r in map(json.loads, (root / "data/prepared/val.jsonl").read_text().splitlines())}
    for key, (value,) in result.samples.items():
        prompt = student_prompt_ids(tok, rows[key]["problem"])
        target = tok(rows[key]["solution"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0].float()
        scored = prompt[-1:] + target  # the prompt's final newline, then the solution
        logp = logits[len(prompt) - 2:-1].log_softmax(-1).gather(1, torch.tensor(scored)[:, None]).sum()
        assert value == pytest.approx(float(logp) / len(target), rel=1e-3, abs=1e-3), key
    assert result.score == pytest.approx(np.mean([v[0] for v in result.samples.values()]))
    assert result.score < 0


@pytest.mark.parametrize("backend", ["opsd", "hf"])
def test_answer_task_scores_the_final_line_behind_the_prompt_and_the_rest_of_the_solution(
        project: tuple[Path, Params], tmp_path: Path, backend: str) -> None:
    """opsd_val_answer_ll through a real lm-eval run equals the answer line's log-probability computed
    directly behind the student's prompt and the solution's earlier lines, per answer-line token (lm-eval moves
    the newline before the line out of its context, so that newline is scored too). Evaluated beside
    opsd_val_ll, whose requests are the same tokens cut elsewhere: lm-eval's hf model shares one forward between
    equal token sequences and reads each continuation at the first request's cut, so with eval.backend hf the
    harness must keep the two kinds in separate runs (with them together every value here was ~15x too low);
    opsd's model reads each request at its own cut from the one forward, in one run."""
    from opsd_core.algorithm.prompts import student_prompt_ids
    from opsd_core.evaluation.harness import LL_PER_TOKEN, evaluate_model
    from opsd_core.models.sources import load_model_and_tokenizer, resolve_base_dir

    root, params = project
    tasks = ["opsd_val_ll", "opsd_val_answer_ll"]
    cfg = params.eval.model_copy(update={"tasks": tasks, "backend": backend})
    write_task_yamls(tmp_path, root / "data/prepared/val.jsonl", root / "data/eval/gsm8k100.jsonl", cfg)
    base = resolve_base_dir(params.model, root)
    evaluated = evaluate_model(str(base), None, tasks, cfg, tmp_path).tasks
    result = evaluated["opsd_val_answer_ll"]
    assert result.metric == LL_PER_TOKEN and result.n == 5 and evaluated["opsd_val_ll"].n == 5
    # the solution's earlier lines open the assistant's turn, unclosed
    assert result.example["prompt"].endswith("<|im_start|>assistant\n" + answer_split(_row(0, {})["solution"])[0])
    model, tok = load_model_and_tokenizer(params.model, root)
    rows = {r["id"]: r for r in map(json.loads, (root / "data/prepared/val.jsonl").read_text().splitlines())}
    for key, (value,) in result.samples.items():
        head, line = answer_split(rows[key]["solution"])
        prompt = student_prompt_ids(tok, rows[key]["problem"])
        context = prompt + tok(head.rstrip(), add_special_tokens=False)["input_ids"]
        ids = prompt + tok(head + line, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = logits[len(context) - 1:-1].log_softmax(-1).gather(1, torch.tensor(ids[len(context):])[:, None]).sum()
        assert value == pytest.approx(float(logp) / len(tok(line, add_special_tokens=False)["input_ids"]),
                                      rel=1e-3, abs=1e-3), key


def test_the_evaluation_takes_its_device_from_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from opsd_core.backends.capabilities import CapabilityError, probe
    from opsd_core.stages.evaluate import eval_device

    probe.cache_clear()  # probed again under OPSD_HIDE, and again after the test
    monkeypatch.setenv("OPSD_HIDE", "cuda")  # the plan's probe sees no GPU, whatever the machine has
    try:
        assert eval_device(Params()) == "cpu"
        params = Params()
        params.train.device = "cpu"
        assert eval_device(params) == "cpu"
        params = Params()
        params.eval.device = "cuda"  # explicit: honoured or refused, never silently moved
        with pytest.raises(CapabilityError, match="evaluation on cuda: .*no CUDA device"):
            eval_device(params)
    finally:
        probe.cache_clear()
