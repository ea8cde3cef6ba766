"""On a team's servers: a tracking server on PostgreSQL with its artifacts in an S3-compatible store, a Prefect
server on PostgreSQL, a DVC remote on S3, all real processes on loopback (tests/servers.py), started here.

What is checked: ``opsd doctor`` sees each service and where its credentials come from (never their values);
a registration lands in PostgreSQL and S3 and another state folder (another machine) reads the champion
back; DVC data pushed from one clone is pulled by another; a tracking server that does not answer stops a
run in one line, before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opsd_core.config import Params
from opsd_core.layout import CANDIDATE_META
from opsd_core.registry.lineage import dvc_out_md5
from opsd_core.stages.register import register
from opsd_core.stages.status import render_status, status
from tests.servers import (
    BIN,
    S3_ENV,
    Postgres,
    free_port,
    postgres,
    postgres_or_skip,
    s3_endpoint,
    s3_keys,
    serve_mlflow,
    serve_prefect,
    stop_group,
)
from tests.support import INGEST_CALLER, cli_project, eval_report, opsd, registry_project, tiny_llama

pytestmark = pytest.mark.slow  # servers and subprocesses: out of the fast lane (make test-fast)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS, DATA = "mlflow-artifacts", "dvc-store"


@dataclass(frozen=True)
class Team:
    mlflow: str
    prefect: str
    s3: str
    env: dict[str, str]  # what a client machine sets: the servers' addresses and the S3 credentials
    pg: Postgres  # the cluster behind both servers: a scenario's own server gets a database there


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    postgres_or_skip()
    tmp = tmp_path_factory.mktemp("team")
    with postgres() as pg, s3_endpoint(tmp, (ARTIFACTS, DATA)) as s3:
        pg.create_db("mlflow")
        pg.create_db("prefect")
        s3_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
        auth = f"team:{uuid.uuid4().hex}"  # the Prefect server's basic auth; clients send PREFECT_API_AUTH_STRING
        with serve_mlflow(tmp, free_port(), backend=pg.url("mlflow", "psycopg"), artifacts=f"s3://{ARTIFACTS}/mlflow",
                          env=s3_env) as mlflow_url, serve_prefect(tmp, pg.url("prefect", "asyncpg"),
                                                                   {"PREFECT_SERVER_API_AUTH_STRING": auth}) as api:
            yield Team(mlflow_url, api, s3, {**S3_ENV, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": api,
                                             "PREFECT_API_AUTH_STRING": auth}, pg)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base"))


def _git_dvc_project(path: Path, cache: Path, s3: str, prefix: str = "store") -> Path:
    """A smoke project folder under git and DVC whose default DVC remote is the S3 endpoint's bucket."""
    cli_project(path, cache)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "remote", "add", "-d", "team", f"s3://{DATA}/{prefix}"],
                [str(BIN / "dvc"), "remote", "modify", "team", "endpointurl", s3]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True, timeout=120)
    return path


def test_doctor_sees_every_team_service_and_names_credentials_without_their_values(
        team: Team, tmp_path: Path) -> None:
    import mlflow
    import prefect

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    project = _git_dvc_project(tmp_path / "p", tmp_path / "m", team.s3)
    env = {**team.env, "AWS_SECRET_ACCESS_KEY": secret}
    proc = opsd(project, "doctor", "--json", env=env)
    found = {r["service"]: r for r in json.loads(proc.stdout)}
    assert all(r["answers"] for r in found.values()), found
    assert found["mlflow"]["address"] == team.mlflow and found["mlflow"]["version"] == mlflow.__version__
    assert found["prefect"]["version"] == prefect.__version__ and "PREFECT_API_URL" in found["prefect"]["address"]
    assert found["prefect"]["credentials"] == "PREFECT_API_AUTH_STRING"
    assert found["dvc remote"]["address"] == f"team: s3://{DATA}/store at {team.s3}"
    assert found["dvc remote"]["credentials"] == "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
    assert secret not in proc.stdout + proc.stderr
    table = opsd(project, "doctor", env=env).stdout
    assert table.count("ok: answers") == 3 and secret not in table and team.env["PREFECT_API_AUTH_STRING"] not in table
    for auth, why in (("", "asks for credentials: set PREFECT_API_AUTH_STRING"),
                      ("team:wrong", "rejects the credentials in PREFECT_API_AUTH_STRING")):
        proc = opsd(project, "doctor", env={**env, "PREFECT_API_AUTH_STRING": auth}, check=False)
        assert proc.returncode == 1
        assert why in next(line for line in proc.stdout.splitlines() if line.startswith("prefect"))


def test_doctor_reports_each_dead_service_in_one_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    project = _git_dvc_project(tmp_path / "p", tmp_path / "m", dead)
    proc = opsd(project, "doctor", env={**S3_ENV, "MLFLOW_TRACKING_URI": dead, "PREFECT_API_URL": f"{dead}/api"},
                check=False)
    assert proc.returncode == 1
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "FAILED: cannot connect: connection refused" in lines["mlflow"]
    assert "FAILED: cannot connect: connection refused" in lines["prefect"]
    assert "FAILED: cannot reach" in lines["dvc"] or "FAILED: no answer" in lines["dvc"]


@pytest.mark.parametrize("command", ["status", "register", "promote"])
def test_registry_commands_name_a_dead_tracking_server_in_one_line(tmp_path: Path, command: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    project = cli_project(tmp_path / "p", tmp_path / "m")
    args = [command, "--rollback"] if command == "promote" else [command]
    proc = opsd(project, *args, env={"MLFLOW_TRACKING_URI": dead}, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"opsd {command}: ServiceError: the MLflow tracking store at {dead} is not usable: cannot connect: "
        "connection refused; nothing was started (registry.tracking_uri or MLFLOW_TRACKING_URI; `opsd doctor` "
        "checks every service)"]


@pytest.mark.parametrize("service", ["mlflow", "prefect"])
def test_a_dead_server_stops_the_run_in_one_line_before_anything_starts(tmp_path: Path, service: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    project = cli_project(tmp_path / "p", tmp_path / "m")
    env = {"MLFLOW_TRACKING_URI": dead} if service == "mlflow" else {"PREFECT_API_URL": f"{dead}/api"}
    proc = opsd(project, "run", env=env, check=False)
    assert proc.returncode == 1
    said = {"mlflow": f"the MLflow tracking store at {dead} is not usable: cannot connect: connection refused; "
                      "nothing was started (registry.tracking_uri or MLFLOW_TRACKING_URI; `opsd doctor` checks "
                      "every service)",
            "prefect": f"the Prefect API at {dead}/api is not usable: cannot connect: connection refused; nothing "
                       "was started (PREFECT_API_URL; `opsd doctor` checks every service)"}[service]
    assert proc.stderr.strip().splitlines() == [f"opsd run: ServiceError: {said}"]
    assert not (project / "data").exists() and not (project / ".dvc").exists()  # no bootstrap, no data


def test_a_registration_lands_in_postgresql_and_s3_and_another_machine_reads_it(
        team: Team, tmp_path: Path, base_dir: Path) -> None:
    name = f"team-model-{uuid.uuid4().hex[:8]}"  # the servers are shared by this module's tests
    params = Params(registry={"tracking_uri": team.mlflow, "model_name": name}, eval={"bootstrap_samples": 200})
    root = tmp_path / "machine-a"
    registry_project(root, base_dir, 1, eval_report(cand=30))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in S3_ENV.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", team.s3)  # the client uploads through the server: no S3 needed,
        res = register(params, root)                 # but a user's shell may well have it
    assert res["champion"] == "1" and res["promoted"]
    keys = s3_keys(team.s3, ARTIFACTS, "mlflow/")
    assert any(k.endswith("artifacts/candidate/adapter_model.safetensors") for k in keys), keys
    other = tmp_path / "machine-b"  # its own state folder: only the servers are shared
    other.mkdir()
    seen = status(params, other)
    assert seen["champion"]["version"] == "1" and seen["champion"]["scores"]["candidate"] is not None
    # the move was made from machine A: B reads it from the registry, so the champion is audited there too
    assert seen["unaudited"] is None and [m["to_version"] for m in seen["recent_moves"]][-1] == "1"
    assert f"tracking {team.mlflow}" in render_status(seen)


def test_dvc_data_pushed_from_one_clone_is_pulled_by_another(team: Team, tmp_path: Path) -> None:
    prefix = f"round-trip-{uuid.uuid4().hex[:8]}"  # the bucket is shared by this module's tests
    first = _git_dvc_project(tmp_path / "a", tmp_path / "m", team.s3, prefix)
    raw = first / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "traces.jsonl").write_text('{"problem": "1 + 1", "answer": "2"}\n')
    env = {**team.env}

    def run(cwd: Path, *cmd: str) -> None:
        subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, timeout=300, env={**os.environ, **env})

    run(first, str(BIN / "dvc"), "add", "data/raw")
    run(first, "git", "add", "-A")
    run(first, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data")
    run(first, str(BIN / "dvc"), "push")
    assert s3_keys(team.s3, DATA, f"{prefix}/")
    second = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(first), str(second))
    run(second, str(BIN / "dvc"), "pull")
    assert (second / "data/raw/traces.jsonl").read_bytes() == (raw / "traces.jsonl").read_bytes()


def test_postgresql_restarted_while_a_registration_runs_costs_a_retry_not_a_double(
        tmp_path: Path, base_dir: Path) -> None:
    """The tracking server's database goes away just before a registration and comes back seconds later:
    MLflow's client retries the server's errors, the registration completes once, and a rerun adds nothing."""
    with postgres() as pg, serve_mlflow(tmp_path, free_port(),
                                        backend=pg.url(pg.create_db("mlflow"), "psycopg")) as url:
        params = Params(registry={"tracking_uri": url, "model_name": "restart-model"},
                        eval={"bootstrap_samples": 200})
        root = tmp_path / "proj"
        registry_project(root, base_dir, 3, eval_report(cand=30))
        pg.stop("fast")
        with ThreadPoolExecutor(1) as pool:
            began = time.monotonic()
            running = pool.submit(register, params, root)
            time.sleep(5)  # the registration is meanwhile failing against the server and retrying
            assert not running.done()
            pg.start()
            res = running.result(timeout=600)
            took = time.monotonic() - began
        print(f"registration across a PostgreSQL restart: {took:.0f} s")
        from mlflow import MlflowClient

        client = MlflowClient(url, url)
        versions = client.search_model_versions("name='restart-model'")
        assert [str(v.version) for v in versions] == [res["version"]] and res["champion"] == res["version"]
        assert client.get_run(res["run_id"]).info.status == "FINISHED"
        assert register(params, root)["already_registered"]
        assert len(client.search_model_versions("name='restart-model'")) == 1


def test_the_s3_endpoint_down_during_dvc_push_is_finished_by_the_next_run(team: Team, tmp_path: Path) -> None:
    """New traces are ingested while the S3 endpoint does not answer: the push fails in one line and the ingest
    journal stays; with the endpoint back, the next run pushes, and every object reaches the bucket."""
    prefix = f"push-down-{uuid.uuid4().hex[:8]}"  # the bucket is shared by this module's tests
    root = _git_dvc_project(tmp_path / "p", tmp_path / "m", f"http://127.0.0.1:{free_port()}", prefix)  # dead
    incoming = root / Params().flow.source_dir
    incoming.mkdir()
    for i in range(3):
        row = {"id": f"s3-{i}", "problem": f"Ada has {i} pens and buys 4 more. How many?",
               "solution": f"{i} + 4 = {i + 4}\n#### {i + 4}", "answer": str(i + 4)}
        (incoming / f"batch{i}.jsonl").write_text(json.dumps(row) + "\n")
    env = {**os.environ, **S3_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def ingest() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "python"), "-c", INGEST_CALLER, str(root)], env=env, capture_output=True,
                              text=True, timeout=600)

    began = time.monotonic()
    down = ingest()
    print(f"dvc push against a dead S3 endpoint failed after {time.monotonic() - began:.0f} s")
    (line,) = down.stderr.strip().splitlines()
    assert down.returncode == 1 and line.startswith("`dvc push data/raw.dvc` failed (exit 255): ERROR: "), line
    assert "Could not connect to the endpoint URL" in line  # DVC's reason, not only its exit code
    assert (root / ".opsd" / "ingest.pending").is_file() and not s3_keys(team.s3, DATA, f"{prefix}/")
    subprocess.run([str(BIN / "dvc"), "remote", "modify", "team", "endpointurl", team.s3], cwd=root, check=True,
                   capture_output=True, timeout=120)
    back = ingest()
    assert back.returncode == 0, back.stderr
    result = json.loads(back.stdout)
    assert result["pushed"] and result["finished_interrupted_ingest"]
    assert not (root / ".opsd" / "ingest.pending").exists()
    status = subprocess.run([str(BIN / "dvc"), "status", "-c", "data/raw.dvc"], cwd=root, env=env, check=True,
                            capture_output=True, text=True, timeout=120).stdout
    assert "in sync" in status.lower() and s3_keys(team.s3, DATA, f"{prefix}/")


# a deployment's flow run, driven through Prefect's client in a subprocess (this process's Prefect settings stay
# untouched): `start NAME` prints the deployment's cron and the new run's id; `wait RUN SECONDS [TASK]` waits
# until the task run named TASK is running (or the flow run is final) and prints the run's state; `slots TAG`
# prints how many slots of the global concurrency limit TAG are held
_DRIVE_RUN = """
import sys, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
with get_client(sync_client=True) as client:
    if sys.argv[1] == "start":
        deployment = client.read_deployment_by_name(sys.argv[2])
        print("cron", deployment.schedules[0].schedule.cron if deployment.schedules else None, flush=True)
        print("run", client.create_flow_run_from_deployment(deployment.id).id, flush=True)
        raise SystemExit(0)
    if sys.argv[1] == "slots":
        print("active", client.read_global_concurrency_limit_by_name(sys.argv[2]).active_slots, flush=True)
        raise SystemExit(0)
    run_id, deadline = sys.argv[2], time.monotonic() + float(sys.argv[3])
    task = sys.argv[4] if len(sys.argv) > 4 else None
    while time.monotonic() < deadline:
        state = client.read_flow_run(run_id).state
        if state is not None and state.is_final():
            break
        if task and any(t.name.startswith(task) and t.state and t.state.is_running() for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))):
            break
        time.sleep(1)
    print("state", state.type.value if state else None, flush=True)
"""


@dataclass(frozen=True)
class Deployed:
    a: Path  # machine A's checkout, where the deployment was made
    origin: Path  # the team's git remote
    env: dict[str, str]  # A's environment (the servers' addresses and credentials)
    pool: str
    name: str  # the deployment
    model: str  # the registered model

    def sh(self, cwd: Path, *cmd: str, env: dict[str, str] | None = None) -> str:
        return subprocess.run(list(cmd), cwd=cwd, env=env or self.env, check=True, capture_output=True, text=True,
                              timeout=600).stdout

    def drive(self, *args: str) -> dict[str, str]:
        said = self.sh(self.a, str(BIN / "python"), "-c", _DRIVE_RUN, *args)
        return dict(line.split(" ", 1) for line in said.splitlines())

    def start_run(self) -> tuple[str, str]:
        """(the deployment's cron, the id of a new flow run of it)."""
        said = self.drive("start", f"opsd-retrain/{self.name}")
        return said["cron"], said["run"]


def _deploy_from_a(tmp_path: Path, team_env: dict[str, str], s3: str) -> Deployed:
    """Machine A commits the project with its data pushed to the S3 remote and deploys the retrain flow on a new
    process work pool (cron Mondays 03:00)."""
    import yaml

    from benchmarks.common import fresh_smoke_clone
    from flows.bootstrap import bootstrap
    from opsd_core.config import load_params

    key = uuid.uuid4().hex[:8]
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True, timeout=60)
    a = fresh_smoke_clone(tmp_path / "a", tmp_path / "models", with_dvc_config=True)
    for package in ("flows", "opsd_core"):  # the project is this repository: the worker runs its flow file
        shutil.copytree(REPO / package, a / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = Deployed(a, origin, {**os.environ, **team_env}, f"pool-{key}", f"team-{key}", f"team-worker-{key}")
    tree = yaml.safe_load((a / "params.yaml").read_text())
    tree["flow"].update({"work_pool": done.pool, "source": str(origin), "source_branch": "main"})
    tree["registry"]["model_name"] = done.model
    (a / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    dvc = str(BIN / "dvc")
    done.sh(a, dvc, "remote", "add", "-f", "-d", "team", f"s3://{DATA}/{key}")
    done.sh(a, dvc, "remote", "modify", "team", "endpointurl", s3)
    bootstrap(load_params(a / "params.yaml"), a)  # the bundled data, `dvc add`-ed
    done.sh(a, dvc, "push")
    done.sh(a, "git", "add", "-A")
    done.sh(a, "git", "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "project")
    done.sh(a, "git", "push", "-q", str(origin), "HEAD:main")
    done.sh(a, str(BIN / "prefect"), "work-pool", "create", done.pool, "--type", "process")
    opsd(a, "deploy", "--cron", "0 3 * * 1", "--name", done.name, "--register-only", env=team_env)
    return done


@contextlib.contextmanager
def _worker_in_b(deployed: Deployed, b: Path) -> Iterator[Path]:
    """Machine B: its own checkout and Prefect home, a process worker on the deployment's pool; only the servers
    are shared. Yields the worker's log."""
    deployed.sh(b.parent, "git", "clone", "-q", "-b", "main", str(deployed.origin), str(b))
    env = {**deployed.env, "PREFECT_HOME": str(b / ".prefect-home"),
           "PATH": f"{BIN}{os.pathsep}{deployed.env['PATH']}"}
    log = b / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", deployed.pool, "--type",
                                   "process"], cwd=b, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            yield log
        finally:  # a worker asked to stop finishes its shutdown in its own time: killed after 30 s
            stop_group(worker, timeout=30)


def _registered(deployed: Deployed, tracking: str) -> dict[str, Any]:
    """A's `opsd status` for the deployment's model."""
    from opsd_core.config import load_params

    params = load_params(deployed.a / "params.yaml")
    return status(params.model_copy(update={"registry": params.registry.model_copy(
        update={"tracking_uri": tracking, "model_name": deployed.model})}), deployed.a)


def test_a_deployment_on_one_clone_runs_on_another_through_a_server_restart_and_a_third_reproduces_it(
        team: Team, tmp_path: Path) -> None:
    """Machine A commits the project (data pushed to the S3 remote) and deploys the retrain flow on a work pool of
    the team's Prefect server (PostgreSQL, basic auth); the worker lives in machine B's checkout, clones the
    project for the run and pulls the data version. While the run trains (its training slot taken on the server)
    the server stops and comes back on the same address seconds later, its concurrency leases kept in files
    (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE): the run's client retries across the gap, the run completes and
    registers once into the shared MLflow, and A's `opsd status` shows that version with B's lineage. The
    worker outlives the gap; the next run of the deployment completes without a second version (the same
    weights are already registered) and the slot is given back. A third fresh clone pulls the data version and
    `dvc repro train` gives the registered weights' hash.

    One scenario, not two: each deployment trains a smoke pipeline on a worker (~2 min on 2 cores)."""
    with contextlib.ExitStack() as server:
        # the team's kind of server, but this scenario's own: the module's server must not go away under others
        database, port = team.pg.url(team.pg.create_db(f"prefect-{uuid.uuid4().hex[:8]}"), "asyncpg"), free_port()
        home = {"PREFECT_HOME": str(tmp_path / "server-home"),  # the leases' files: the same for both servers
                "PREFECT_SERVER_API_AUTH_STRING": team.env["PREFECT_API_AUTH_STRING"]}
        api = server.enter_context(serve_prefect(tmp_path / "server-1", database, home, port=port))
        deployed = _deploy_from_a(tmp_path, {**team.env, "PREFECT_API_URL": api}, team.s3)
        with _worker_in_b(deployed, tmp_path / "b") as log:
            cron, first = deployed.start_run()
            deadline = time.monotonic() + 600
            while "train: running" not in log.read_text():  # printed once the training slot is held
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
            began = time.monotonic()
            server.close()  # the server and its API go away while the flow trains
            time.sleep(3)
            server.enter_context(serve_prefect(tmp_path / "server-2", database, home, port=port))
            print(f"the Prefect server was away for {time.monotonic() - began:.0f} s")
            state = deployed.drive("wait", first, "900")["state"]
            assert state == "COMPLETED", log.read_text()[-4000:]
            print(f"the interrupted run completed {time.monotonic() - began:.0f} s after the server stopped")
            _, second = deployed.start_run()
            assert deployed.drive("wait", second, "500")["state"] == "COMPLETED", log.read_text()[-4000:]
        held = deployed.drive("slots", Params().flow.concurrency_tag)["active"]
    assert cron == "0 3 * * 1"
    assert held == "0"  # the slot taken before the restart was given back after it
    from mlflow import MlflowClient

    versions = MlflowClient(team.mlflow, team.mlflow).search_model_versions(f"name='{deployed.model}'")
    assert len(versions) == 1 and versions[0].tags["lineage.flow_run_id"] == first
    seen = _registered(deployed, team.mlflow)
    registered = seen["champion"] or seen["challenger"]
    assert registered is not None and registered["lineage"]["flow_run_id"] == first
    assert registered["lineage"]["git_commit"] == deployed.sh(deployed.a, "git", "rev-parse", "HEAD").strip()
    # B trained on the data version A pushed (its clone had only the .dvc file: the flow pulled it)
    assert registered["lineage"]["dvc_raw_md5"] == dvc_out_md5(deployed.a / "data/raw.dvc")

    c = tmp_path / "c"  # a third machine: the commit, the data version from the remote, the pipeline's own repro
    deployed.sh(tmp_path, "git", "clone", "-q", "-b", "main", str(deployed.origin), str(c))
    path = {**deployed.env, "PATH": f"{BIN}{os.pathsep}{deployed.env['PATH']}"}
    deployed.sh(c, str(BIN / "dvc"), "pull", "-q", "data/raw.dvc", env=path)
    deployed.sh(c, str(BIN / "dvc"), "repro", "-q", "train", env=path)
    meta = json.loads((c / "models/candidate" / CANDIDATE_META).read_text())
    assert meta["content_hash"] == registered["content_hash"]
