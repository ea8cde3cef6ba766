"""Real servers on loopback for the tests: PostgreSQL, an S3-compatible endpoint (moto), `mlflow server`,
`prefect server`. Each is a context manager that starts the process in its own session, waits until it
answers, yields its address and stops the whole process group afterwards (the MLflow and Prefect servers
run their apps in child processes).

PostgreSQL comes from Debian's package (`make install` installs it when missing and root); ``initdb`` refuses
to run as root, so as root the cluster is created and run as the ``postgres`` user in a folder that user can
traverse. Without PostgreSQL binaries :func:`postgres_or_skip` skips, naming the install command.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.server import LEASE_STORAGE
from opsd_core.net import answers, free_port

BIN = Path(sys.executable).parent  # the venv's scripts: mlflow, prefect, moto_server, dvc
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it if it is still there after ``timeout`` seconds (the group
    too when its leader has already exited: a server's children may outlive it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen | None, log: Path, what: str,
               timeout: float = 180) -> None:
    """Until ``ready()`` holds; an error with the log's tail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        if ready():
            return
        if proc is None:
            time.sleep(0.2)
        else:  # pause by waiting on the process: returns at once if it dies
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.3)
    raise RuntimeError(f"{what} did not answer in {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc)


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else Debian's versioned folder (the newest)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


@dataclass
class Postgres:
    """A running cluster: ``url(db)`` gives a SQLAlchemy URL for MLflow (``driver="psycopg"``) or Prefect
    (``driver="asyncpg"``)."""

    port: int
    data: Path
    log: Path
    as_user: list[str]
    user: str = "opsd"

    def url(self, db: str, driver: str | None = None) -> str:
        scheme = "postgresql" if driver is None else f"postgresql+{driver}"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def pg_ctl(self, *args: str) -> None:
        ctl = pg_bin("pg_ctl")
        assert ctl is not None
        subprocess.run([*self.as_user, ctl, "-D", str(self.data), *args], check=True, capture_output=True,
                       timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl("-o", options, "-l", str(self.log), "-w", "-t", "120", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")


def postgres_or_skip() -> None:
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        pytest.skip("PostgreSQL is not installed (`make install` installs Debian's `postgresql` when run as root)")


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on a free loopback port (trust auth, user ``opsd``), removed afterwards."""
    postgres_or_skip()
    root = Path(tempfile.mkdtemp(prefix="opsd-pg-"))
    root.chmod(0o755)  # the postgres user must traverse it (pytest's folders are 0700)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = Postgres(port=free_port(), data=root / "data", log=root / "server.log", as_user=as_user)
    initdb = pg_bin("initdb")
    assert initdb is not None
    subprocess.run([*as_user, initdb, "-D", str(cluster.data), "-A", "trust", "-U", cluster.user, "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=180)
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


# -- S3 (moto's standalone server) --------------------------------------------------------------------------
@contextlib.contextmanager
def s3_endpoint(tmp: Path, buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port with ``buckets`` created; yields its URL. Clients
    take the credentials of :data:`S3_ENV` (moto accepts any)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "moto.log"
    with _process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log) as proc:
        wait_until(lambda: answers(f"{url}/moto-api/"), proc, log, "moto_server", timeout=120)
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, **_boto_credentials())
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield url


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# -- MLflow -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_mlflow(tmp_path: Path, port: int, backend: str | None = None, artifacts: str | None = None,
                 env: dict[str, str] | None = None, app: str | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:``port`` while the block runs: ``backend`` a store URI (default
    SQLite under ``tmp_path``), ``artifacts`` where the server keeps artifacts (default a folder; an
    ``s3://`` URI with ``MLFLOW_S3_ENDPOINT_URL`` in ``env``), ``app`` e.g. ``basic-auth``."""
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend or f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", artifacts or str(tmp_path / "server-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if app:
        cmd += ["--app-name", app]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with _process(cmd, log, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}) as proc:
        wait_until(lambda: answers(f"{url}/health"), proc, log, "mlflow server", timeout=240)
        yield url


# -- Prefect ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_prefect(tmp_path: Path, database: str | None = None, env: dict[str, str] | None = None,
                  port: int | None = None) -> Iterator[str]:
    """`prefect server start` on ``port`` (default a free one) of loopback (``database``: a
    ``postgresql+asyncpg://`` URL, default its own SQLite under ``tmp_path``); yields the API URL."""
    port = port or free_port()
    # concurrency leases in files, as `opsd server` keeps them (a restart otherwise leaks a held training slot)
    server_env = {"PREFECT_HOME": str(tmp_path / "prefect-server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
                  **(env or {})}
    if database:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    log = tmp_path / "prefect-server.log"
    api = f"http://127.0.0.1:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _process(cmd, log, server_env) as proc:
        wait_until(lambda: answers(f"{api}/health") or _needs_auth(f"{api}/health"), proc, log, "prefect server",
                   timeout=240)
        yield api


def _needs_auth(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=0.5).close()
    except urllib.error.HTTPError as err:
        return err.code == 401
    except OSError:
        return False
    return False
