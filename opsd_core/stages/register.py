"""``opsd register``: the candidate into the MLflow registry, through the gate.

One MLflow run (params, per-step metrics, eval metrics, plots, model card, reports, the adapter
under ``model/``), then - under the registry lock and the server-side promotion lease
(:mod:`opsd_core.registry.promotion_lease`, which serialises pipelines on other machines sharing the
tracking server) - re-read the current champion, gate against base and champion, create the model
version, move ``challenger`` (and ``champion`` if the gate says so). A failure anywhere marks the run
FAILED and leaves the registry's versions and aliases as they were. Keyed by the candidate's content hash:
registering the same weights twice returns the existing version and logs nothing. Under the Prefect
flow, ``$OPSD_MLFLOW_RUN_ID`` names the pipeline's run: register logs into it and leaves closing it to
the flow. ``opsd promote --rollback`` is :mod:`opsd_core.stages.promote`; ``opsd status`` is
:mod:`opsd_core.stages.status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from opsd_core.config import Params
from opsd_core.io import write_json, write_metrics
from opsd_core.layout import (
    CHALLENGER,
    CHAMPION,
    EVAL_REPORT,
    GAP_GROUP,
    SUMMARY_GROUP,
    TRAIN_GROUP,
    VS_BASE_GROUP,
    Env,
    Layout,
)
from opsd_core.registry import card, decision, lineage, pyfunc
from opsd_core.registry.audit import actor, audit_of, move_alias, registry_lock, unaudited_champion
from opsd_core.registry.gate import ChampionEvidence, decide
from opsd_core.registry.leases import FAILURE_TAG
from opsd_core.registry.promotion_lease import PromotionLease, promotion_lease
from opsd_core.registry.reach import MLFLOW_CREDENTIALS, credentials_source
from opsd_core.registry.store import (
    RegistryError,
    Store,
    ensure_experiment,
    ensure_registered_model,
    find_by_content_hash,
    open_client,
    resolve_store,
    version_by_alias,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

MODEL_DIR = "model"
EVAL_ARTIFACT = f"eval/{EVAL_REPORT}"
_KEY_MAX, _PARAM_MAX, _TAG_MAX = 250, 6000, 8000  # MLflow's key, param value and run tag limits


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise RegistryError(f"{what} not found: {path} (run the earlier stages first)")
    return json.loads(path.read_text())


def _check_report(report: Any, path: Path) -> None:
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict) or not report["tasks"]:
        raise RegistryError(f"{path}: no tasks")
    for task, res in report["tasks"].items():
        for who in ("base", "candidate"):
            side = res.get(who) if isinstance(res, dict) else None
            if not isinstance(side, dict) or not isinstance(side.get("score"), int | float):
                raise RegistryError(f"{path}: tasks.{task}.{who}.score missing or not a number")
            if not isinstance(side.get("samples", {}), dict):
                raise RegistryError(f"{path}: tasks.{task}.{who}.samples must map doc id -> outcomes")


@dataclass(frozen=True)
class RegisterInputs:
    """Everything register reads from the earlier stages, checked before any MLflow call."""

    layout: Layout
    meta: dict[str, Any]  # the candidate's opsd_candidate.json: base_model, content_hash, adapter, ...
    report: dict[str, Any]  # eval.json: per task, base and candidate scores, samples and the paired diff
    train: dict[str, Any]  # train.json
    curve: list[dict[str, float]]  # train_curve.csv, one row per step
    data: dict[str, Any]  # data.json ({} when the data were prepared elsewhere)

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])


def load_inputs(params: Params, root: Path) -> RegisterInputs:
    """Read and check everything register needs before any MLflow call."""
    layout = Layout.of(params, root)
    cand_dir = layout.candidate
    meta = _read_json(layout.candidate_meta, "candidate metadata")
    for key in ("base_model", "content_hash"):
        if not meta.get(key):
            raise RegistryError(f"{layout.candidate_meta}: missing {key!r}")
    needed = ("adapter_config.json", "adapter_model.safetensors") if meta.get("adapter") else ("config.json",)
    missing = [f for f in needed if not (cand_dir / f).is_file()]
    if missing:
        raise RegistryError(f"candidate {cand_dir} lacks {', '.join(missing)}")
    report = _read_json(layout.eval_report, "evaluation report")
    _check_report(report, layout.eval_report)
    evaluated = ((report.get("models") or {}).get("candidate") or {}).get("content_hash")
    if evaluated and evaluated != meta["content_hash"]:  # a stale report must not gate new weights
        raise RegistryError(f"{EVAL_REPORT} scored candidate {evaluated}, but models hold {meta['content_hash']}: "
                            "re-run evaluate")
    data_path = layout.data_report
    return RegisterInputs(layout=layout, meta=meta, report=report,
                          train=_read_json(layout.train_report, "training report"),
                          curve=card.read_curve(layout.train_curve),
                          data=json.loads(data_path.read_text()) if data_path.is_file() else {})


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} within MLflow's key and param-value limits."""
    if not isinstance(tree, dict):
        return {prefix[:_KEY_MAX]: json.dumps(tree) if isinstance(tree, list | tuple) else str(tree)[:_PARAM_MAX]}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return {k: v[:_PARAM_MAX] for k, v in out.items()}


def _version_tags(inp: RegisterInputs, lin: dict[str, Any], verdict: dict[str, Any], cfg: Any) -> dict[str, str]:
    meta, tags = inp.meta, {}
    tags.update({"content_hash": meta["content_hash"], "base_model": str(meta["base_model"]),
                 "adapter": str(bool(meta.get("adapter"))).lower(), "steps": str(meta.get("steps")),
                 "train_params_hash": str(meta.get("params_hash")),
                 "eval.settings_hash": str(inp.report.get("settings", {}).get("settings_hash")),
                 "primary_task": cfg.primary_task})
    tags.update({f"lineage.{k}": str(v) for k, v in lin.items() if v is not None})
    for task, res in inp.report["tasks"].items():
        tags[f"score.{task}.base"] = f"{float(res['base']['score']):.6g}"
        tags[f"score.{task}.candidate"] = f"{float(res['candidate']['score']):.6g}"
        for k in ("mean_diff", "ci_low", "ci_high", "p_better"):
            if k in (res.get("diff") or {}):
                tags[f"score.{task}.{k}"] = f"{float(res['diff'][k]):.6g}"
    tags["gate.promote"] = str(verdict["promote"]).lower()
    tags["gate.reasons"] = "; ".join(verdict["reasons"])
    tags["gate.verdict"] = json.dumps(verdict, sort_keys=True, default=str)
    return tags


def applicable_params(params: Params) -> dict[str, Any]:
    """The settings as MLflow params: sections at the top (``train.lr``, not ``params.train.lr``), without
    the tiny model's settings unless the base model is the tiny one."""
    dump = params.model_dump(mode="json")
    if params.model.base != "tiny":
        dump["model"].pop("tiny", None)
    return dump


def headline_metrics(inp: RegisterInputs, primary: str) -> dict[str, float]:
    """A few short-named metrics the MLflow runs list shows as columns."""
    out: dict[str, float] = {}
    task = inp.report["tasks"].get(primary) or {}
    for who in ("base", "candidate"):
        if who in task:
            out[f"{who}_score"] = float(task[who]["score"])
    diff = task.get("diff") or {}
    for key, name in (("mean_diff", "gain"), ("ci_low", "gain_ci_low"), ("ci_high", "gain_ci_high")):
        if key in diff:
            out[name] = float(diff[key])
    for key, name in (("final_loss", "final_loss"), ("final_kl", "final_kl"), ("wall_s", "train_wall_s")):
        value = inp.train.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _log_run(client: MlflowClient, run_id: str, inp: RegisterInputs, params: Params, lin: dict[str, Any],
             tmp: Path) -> None:
    now = int(time.time() * 1000)
    # the paths the candidate was trained on (opsd env's record, from train.json): device, dtypes, packs
    runtime = {k: inp.train[k] for k in ("execution", "machine", "versions") if isinstance(inp.train.get(k), dict)}
    flat = flatten({**applicable_params(params), "candidate": inp.meta, **runtime})
    # under the flow the training logged its curve into this run step by step (registry/live.py)
    live = any(k.startswith(TRAIN_GROUP) for k in client.get_run(run_id).data.metrics)
    metrics = [] if live else [Metric(f"{TRAIN_GROUP}{k}", v, now, int(row["step"])) for row in inp.curve
                               for k, v in row.items() if k != "step"]
    for task, res in inp.report["tasks"].items():
        metrics += [Metric(f"{VS_BASE_GROUP}{task}/{who}", float(res[who]["score"]), now, 0) for who in ("base", "candidate")]
        metrics += [Metric(f"{VS_BASE_GROUP}{task}/{k}", float(v), now, 0) for k, v in (res.get("diff") or {}).items()
                    if k in ("mean_diff", "ci_low", "ci_high", "p_better")]
    metrics += [Metric(f"{SUMMARY_GROUP}{k}", float(v), now, 0) for k, v in inp.train.items()
                if isinstance(v, int | float) and not isinstance(v, bool)]
    metrics += [Metric(k, v, now, 0) for k, v in headline_metrics(inp, params.registry.primary_task).items()]
    # the self-teacher gap the training started from (algorithm/diagnose.py): the figures, and its reading as a tag
    diagnosis = inp.train.get("diagnosis") or {}
    metrics += [Metric(f"{GAP_GROUP}{k}", float(v), now, 0) for k, v in diagnosis.items()
                if isinstance(v, int | float) and not isinstance(v, bool)]
    tags = [RunTag("opsd.diagnosis", str(diagnosis["reading"]))] if diagnosis.get("reading") else []
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in flat.items()], tags=tags)
    _log_dataset(client, run_id, _training_dataset(inp, lin))
    plots = tmp / "plots"
    plots.mkdir()
    card.plot_training_curve(inp.curve, plots / "training_curve.png")
    card.plot_eval(inp.report, plots / "eval.png")
    client.log_artifacts(run_id, str(plots), "plots")
    layout = inp.layout
    for path in (layout.eval_report, layout.train_report, layout.train_curve, layout.data_report):
        if path.is_file():
            client.log_artifact(run_id, str(path), "eval" if path == layout.eval_report else "reports")
    # an MLflow model (pyfunc): `mlflow.pyfunc.load_model("models:/<name>@champion")` serves it
    pyfunc.save(tmp / "mlflow-model", layout.candidate, inp.meta, params.eval.max_new_tokens, params.model.thinking)
    client.log_artifacts(run_id, str(tmp / "mlflow-model"), MODEL_DIR)


def _training_dataset(inp: RegisterInputs, lin: dict[str, Any]) -> DatasetInput:
    """The prepared training split as the run's MLflow dataset: its content hash as the digest, DVC's version of
    the raw traces (from the lineage) and the path as the source (`dvc pull` at that version gives back the
    same rows)."""
    data_hash = str(inp.data.get("data_hash") or inp.meta.get("data_hash") or "unknown")
    layout = inp.layout
    source = {"path": str(layout.train_split.relative_to(layout.root)), "dvc_raw_md5": lin.get("dvc_raw_md5"),
              "data_hash": data_hash}
    profile = {k: inp.data[k] for k in ("read", "accepted", "train", "val", "rejected") if k in inp.data}
    # MLflow keeps 36 characters of a digest; the whole hash is in the source
    dataset = Dataset(name="opsd-train", digest=data_hash[:36], source_type="dvc", source=json.dumps(source),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def _log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput) -> None:
    """Log the run's dataset. MLflow's SQL store checks whether a dataset exists, then inserts it: two
    registrations of the same data at once race there, and the loser's insert breaks a unique constraint.
    Once the winner's row is in, a retry finds it; a dataset is no reason to fail a registration."""
    for attempt in (1, 2):
        try:
            client.log_inputs(run_id, datasets=[dataset])
            return
        except MlflowException as err:
            if attempt == 2:
                print(f"opsd register: warning: the training dataset was not logged ({str(err)[:160]})",
                      file=sys.stderr)


def _champion_evidence(client: MlflowClient, mv: ModelVersion | None, tmp: Path) -> ChampionEvidence | None:
    if mv is None:
        return None
    report = None
    if mv.run_id:
        try:
            path = client.download_artifacts(mv.run_id, EVAL_ARTIFACT, str(tmp / f"champion-{str(mv.version)}"))
            report = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - any failure means "cannot compare", which the gate reports
            report = None
    return ChampionEvidence(str(mv.version), mv.tags.get("content_hash"), report)


def _write_result(params: Params, root: Path, result: dict[str, Any]) -> dict[str, Any]:
    layout = Layout.of(params, root)
    write_json(layout.registry_report, result)
    write_metrics(layout.reports, "gate", gate_metrics(result.get("verdict")))
    return result


def gate_metrics(verdict: dict[str, Any] | None) -> dict[str, float | int | None]:
    """What the gate decided on, for `dvc metrics show`: promoted (1 or 0) and the primary task's gain over
    the base with its 95% interval (None where the verdict holds none)."""
    vs_base = ((verdict or {}).get("checks") or {}).get("vs_base") or {}
    return {"promoted": int(bool((verdict or {}).get("promote"))), "gain": vs_base.get("mean_diff"),
            "gain_ci_low": vs_base.get("ci_low"), "gain_ci_high": vs_base.get("ci_high")}


def _version_of(mv: ModelVersion | None) -> str | None:
    return None if mv is None else str(mv.version)


def _existing(client: MlflowClient, store: Store, params: Params, mv: ModelVersion) -> dict[str, Any]:
    name = params.registry.model_name
    champ, chall = version_by_alias(client, name, CHAMPION), version_by_alias(client, name, CHALLENGER)
    verdict = json.loads(mv.tags.get("gate.verdict", "null"))
    return {"model_name": name, "version": str(mv.version), "run_id": mv.run_id, "already_registered": True,
            "content_hash": mv.tags.get("content_hash"), "verdict": verdict, "alias_moves": [],
            "promoted": bool(verdict and verdict.get("promote")),
            CHAMPION: _version_of(champ), CHALLENGER: _version_of(chall),
            "tracking_uri": store.tracking_uri}


def _undo(client: MlflowClient, store: Store, name: str, version: str, before: dict[str, str | None],
          run_id: str, lease: PromotionLease) -> None:
    """Best effort after a failure mid-registration: aliases back where they were, version deleted."""
    try:
        for alias, prev in before.items():
            cur = version_by_alias(client, name, alias)
            if cur is not None and str(cur.version) == version:
                move_alias(client, store.state_dir, name, alias, prev, "revert",
                           f"registration of v{version} failed", run_id, lease)
        client.delete_model_version(name, version)
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _register_locked(
    client: MlflowClient, store: Store, params: Params, inp: RegisterInputs,
    run: Any, lin: dict[str, Any], tmp: Path, lease: PromotionLease,
) -> dict[str, Any]:
    """Gate + version + aliases; the caller holds the registry lock and the promotion lease, so the
    champion read here is the one the aliases are moved from."""
    cfg, run_id, content_hash = params.registry, run.info.run_id, inp.content_hash
    dup = find_by_content_hash(client, cfg.model_name, content_hash)
    if dup is not None:  # a racing run registered the same weights first
        client.set_tag(run_id, "opsd.duplicate_of_version", str(dup.version))
        return _existing(client, store, params, dup)
    # before any alias is read: MLflow's basic-auth app answers 403, not 404, for an alias of a model that
    # does not exist yet
    ensure_registered_model(client, cfg.model_name)
    champion = version_by_alias(client, cfg.model_name, CHAMPION)
    # a champion set by hand (MLflow UI or API) is still what the gate compares with; the user is told
    unaudited = unaudited_champion(audit_of(store, cfg.model_name, client), _version_of(champion))
    if unaudited:
        print(f"opsd register: warning: {unaudited}", file=sys.stderr)
        client.set_tag(run_id, "opsd.unaudited_champion", unaudited)
    evidence = _champion_evidence(client, champion, tmp)
    verdict = decide(inp.report, cfg, evidence, content_hash, params.eval.bootstrap_samples, params.eval.seed)
    text = card.model_card(inp.meta, inp.report, inp.train, applicable_params(params), lin,
                           verdict, cfg.model_name)
    (tmp / "model_card.md").write_text(text)
    (tmp / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True, default=str))
    client.log_artifact(run_id, str(tmp / "model_card.md"))
    client.log_artifact(run_id, str(tmp / "model_card.md"), MODEL_DIR)
    client.log_artifact(run_id, str(tmp / "verdict.json"), "gate")
    client.set_tag(run_id, "gate.promote", str(verdict["promote"]).lower())
    # the run's description in the MLflow UI: the decision as a table
    client.set_tag(run_id, "mlflow.note.content", decision.render(verdict, markdown=True))
    before = {a: _version_of(version_by_alias(client, cfg.model_name, a)) for a in (CHALLENGER, CHAMPION)}
    mv = client.create_model_version(
        cfg.model_name, source=f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
        tags=_version_tags(inp, lin, verdict, cfg),
        # what the version page shows first: the gate's decision as a table (the card is longer than the
        # 5,000 characters MLflow keeps in a description)
        description=f"OPSD candidate `{content_hash[:16]}` on `{inp.meta['base_model']}`\n\n"
                    + decision.render(verdict, markdown=True)
                    + f"\n\nThe model card (scores with intervals, data, settings, lineage): `{MODEL_DIR}/model_card.md`.",
    )
    version = str(mv.version)
    moves = []
    try:
        moves.append(move_alias(client, store.state_dir, cfg.model_name, CHALLENGER, version, "register",
                                f"registered candidate {content_hash[:16]}", run_id, lease))
        if verdict["promote"]:
            moves.append(move_alias(client, store.state_dir, cfg.model_name, CHAMPION, version, "promote",
                                    "gate passed: " + "; ".join(verdict["reasons"]), run_id, lease))
    except BaseException:
        _undo(client, store, cfg.model_name, version, before, run_id, lease)
        raise
    champ = version_by_alias(client, cfg.model_name, CHAMPION)
    return {"model_name": cfg.model_name, "version": version, "run_id": run_id, "already_registered": False,
            "content_hash": content_hash, "verdict": verdict, "alias_moves": [m for m in moves if m],
            "promoted": bool(verdict["promote"]), CHAMPION: _version_of(champ), CHALLENGER: version,
            "tracking_uri": store.tracking_uri, "unaudited_champion": unaudited}


def register(params: Params, root: Path) -> dict[str, Any]:
    """Register ``models/candidate`` (idempotent); returns and writes ``reports/registry.json``.

    An MLflow server that cannot be reached (after MLflow's own retries) is a one-line
    :class:`RegistryError`: nothing was registered, and the next run registers the same candidate once
    (versions are keyed by the candidate's content hash)."""
    try:
        return _register(params, root)
    except MlflowException as err:
        uri = resolve_store(params, Path(root)).tracking_uri
        if refused(err):
            raise RegistryError(f"the MLflow server at {uri} refused {credentials_source(MLFLOW_CREDENTIALS)}: "
                                f"{str(err).splitlines()[0][:200]}; nothing was registered or promoted, the run "
                                "is marked FAILED (ask the model's owner for EDIT on it, or use another account)"
                                ) from None
        if not _unreachable(err):
            raise
        raise RegistryError(f"the MLflow server at {uri} cannot be reached ({str(err).splitlines()[0][:160]}); "
                            "nothing was registered or promoted: rerun `opsd register` (or the pipeline) when it "
                            "is back") from None


def refused(err: BaseException) -> bool:
    """Whether an MLflow error is the server's access control saying no (basic-auth: 401 or 403)."""
    return getattr(err, "error_code", None) in ("PERMISSION_DENIED", "UNAUTHENTICATED")


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (an MLflow error) came from a connection that could not be made or kept: MLflow's
    REST client raises its own exception while handling the ``requests`` one, which stays the context."""
    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, lost):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _register(params: Params, root: Path) -> dict[str, Any]:
    root = Path(root).resolve()
    inp = load_inputs(params, root)
    cfg, store = params.registry, resolve_store(params, root)
    client = open_client(store)
    with registry_lock(store.state_dir):
        exp_id = ensure_experiment(client, store, cfg.experiment)
    existing = find_by_content_hash(client, cfg.model_name, inp.content_hash)
    if existing is not None:
        return _write_result(params, root, {**_existing(client, store, params, existing), "experiment_id": exp_id})
    lin = lineage.collect(params, root, inp.data.get("data_hash") or inp.meta.get("data_hash"))
    tags = {f"lineage.{k}": str(v)[:_TAG_MAX] for k, v in lin.items() if v is not None}
    tags["opsd.content_hash"] = inp.content_hash
    pipeline_run = os.environ.get(Env.PIPELINE_RUN)
    if pipeline_run:  # the flow's run: one pipeline run is one MLflow run, and the flow closes it
        run = client.get_run(pipeline_run)
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        run = client.create_run(exp_id, run_name=f"register-{inp.content_hash[:12]}",
                                tags={**tags, **lineage.source_tags(root, "opsd register")})
    try:
        with tempfile.TemporaryDirectory(prefix="opsd-register-") as tmp:
            _log_run(client, run.info.run_id, inp, params, lin, Path(tmp))
            with registry_lock(store.state_dir), promotion_lease(client, cfg.model_name, actor()) as lease:
                result = _register_locked(client, store, params, inp, run, lin, Path(tmp), lease)
    except BaseException as err:
        with contextlib.suppress(Exception):  # the reason on the run; the original error is the one to report
            client.set_tag(run.info.run_id, FAILURE_TAG, f"{type(err).__name__}: {str(err).splitlines()[0]}"[:500]
                           if str(err) else type(err).__name__)
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    if not pipeline_run:
        client.set_terminated(run.info.run_id, "FINISHED")
    return _write_result(params, root, {**result, "experiment_id": exp_id})
