"""Access control as the servers provide it: MLflow's basic-auth app, credentials from the environment only.

Wrong or missing credentials stop a run in one line before anything starts; the password is never written
into reports, the state folder, MLflow params and tags, or the model card; a user with READ on the registered
model cannot register into it or move ``champion``: one line, aliases and audit as they were, run FAILED.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from opsd_core.config import Params
from opsd_core.layout import CHAMPION
from opsd_core.registry.audit import registry_audit
from opsd_core.registry.leases import FAILURE_TAG
from opsd_core.registry.store import RegistryError
from opsd_core.stages.register import register
from opsd_core.stages.status import render_status, status
from tests.servers import free_port, serve_mlflow
from tests.support import cli_project, eval_report, opsd, registry_project, tiny_llama

pytestmark = pytest.mark.slow  # an MLflow server and subprocesses: out of the fast lane (make test-fast)

MODEL, EXPERIMENT = "guarded-model", "guarded"


@dataclass(frozen=True)
class Server:
    url: str
    admin: dict[str, str]
    alice: dict[str, str]  # owns the experiment and the model
    bob: dict[str, str]    # EDIT on the experiment, READ on the model


def _creds(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    admin = _creds("admin", f"admin-{uuid.uuid4().hex}")
    ini = tmp / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / 'auth.db'}\nadmin_username = admin\n"
                   f"admin_password = {admin['MLFLOW_TRACKING_PASSWORD']}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # without its credential cache the app hashes the password on every request (docs/team-servers.md)
                   "auth_cache_ttl_seconds = 300\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    with serve_mlflow(tmp, free_port(), env=env, app="basic-auth") as url:
        alice, bob = _creds("alice", f"alice-{uuid.uuid4().hex}"), _creds("bob", f"bob-{uuid.uuid4().hex}")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in admin.items():
                mp.setenv(key, value)
            from mlflow.server import get_app_client

            users = get_app_client("basic-auth", tracking_uri=url)
            for who in (alice, bob):
                users.create_user(who["MLFLOW_TRACKING_USERNAME"], who["MLFLOW_TRACKING_PASSWORD"])
        yield Server(url, admin, alice, bob)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base"))


def _as(monkeypatch: pytest.MonkeyPatch, who: dict[str, str]) -> None:
    for key, value in who.items():
        monkeypatch.setenv(key, value)


def _admin_client(server: Server, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202 - MlflowClient, lazily
    from mlflow import MlflowClient

    _as(monkeypatch, server.admin)
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


@pytest.mark.parametrize("how", ["wrong", "missing"])
def test_wrong_or_missing_credentials_stop_the_run_in_one_line(server: Server, tmp_path: Path, how: str) -> None:
    project = cli_project(tmp_path / "p", tmp_path / "m")
    wrong = {**server.alice, "MLFLOW_TRACKING_PASSWORD": f"not-{uuid.uuid4().hex}"}
    env = {"MLFLOW_TRACKING_URI": server.url, **(wrong if how == "wrong" else {})}
    if how == "missing":  # a user's shell may have them: the test's own environment must not
        env.update({"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""})
    proc = opsd(project, "run", env=env, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    why = ("the server rejects the credentials in MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD" if how == "wrong"
           else "the server asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    assert line.startswith(f"opsd run: ServiceError: the MLflow tracking store at {server.url} is not usable: {why};")
    assert wrong["MLFLOW_TRACKING_PASSWORD"] not in proc.stdout + proc.stderr
    assert not (project / "data").exists()  # nothing started


def test_status_of_a_model_nobody_registered_yet_says_so(server: Server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The basic-auth app answers 403 (not 404) for an alias of a model that does not exist: status asks for the
    model first, as a user with READ only."""
    _as(monkeypatch, server.bob)
    params = Params(registry={"tracking_uri": server.url, "model_name": f"unborn-{uuid.uuid4().hex[:8]}"})
    seen = status(params, tmp_path)
    assert seen[CHAMPION] is None and seen["challenger"] is None and seen["recent_moves"] == []
    assert "champion  : none" in render_status(seen)


def test_credentials_never_reach_reports_params_tags_or_the_card(
        server: Server, tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _as(monkeypatch, server.alice)
    params = Params(registry={"tracking_uri": server.url, "model_name": MODEL, "experiment": EXPERIMENT},
                    eval={"bootstrap_samples": 200})
    root = tmp_path / "alice"
    registry_project(root, base_dir, 1, eval_report(cand=30))
    res = register(params, root)
    assert res["champion"] == res["version"]
    secret = server.alice["MLFLOW_TRACKING_PASSWORD"]
    for path in root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    client = _admin_client(server, monkeypatch)
    run = client.get_run(res["run_id"])
    written = [*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags]
    assert not [v for v in written if secret in v]
    card = Path(client.download_artifacts(res["run_id"], "model_card.md", str(tmp_path / "dl")))
    assert secret not in card.read_text()


def test_a_read_only_user_cannot_register_or_move_the_champion(
        server: Server, tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server import get_app_client

    name = f"{MODEL}-{uuid.uuid4().hex[:6]}"
    params = Params(registry={"tracking_uri": server.url, "model_name": name, "experiment": EXPERIMENT},
                    eval={"bootstrap_samples": 200})
    _as(monkeypatch, server.alice)
    first = tmp_path / "alice"
    registry_project(first, base_dir, 1, eval_report(cand=30))
    champion = register(params, first)["champion"]
    client = _admin_client(server, monkeypatch)
    users = get_app_client("basic-auth", tracking_uri=server.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    users.grant_user_permission("bob", "experiment", exp.experiment_id, "EDIT")
    users.grant_user_permission("bob", "registered_model", name, "READ")
    audit_before = registry_audit(client, name)
    versions_before = len(client.search_model_versions(f"name='{name}'"))

    _as(monkeypatch, server.bob)
    second = tmp_path / "bob"
    registry_project(second, base_dir, 2, eval_report(cand=40))  # better: the gate would promote it
    with pytest.raises(RegistryError) as info:
        register(params, second)
    message = str(info.value)
    assert "\n" not in message and f"the MLflow server at {server.url} refused MLFLOW_TRACKING_USERNAME" in message
    assert "PERMISSION_DENIED" in message or "ermission" in message
    assert server.bob["MLFLOW_TRACKING_PASSWORD"] not in message

    client = _admin_client(server, monkeypatch)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before
    assert registry_audit(client, name) == audit_before
    bobs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert bobs and bobs[0].data.tags.get(FAILURE_TAG, "").startswith("MlflowException")
