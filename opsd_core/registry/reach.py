"""Does the tracking store answer, and does it accept us? One quick probe, before anything is trained.

MLflow's own client retries a dead server for minutes and then raises three chained tracebacks; a team's
pipeline should instead stop at once with one line naming the server. The probe talks to the store directly
(a REST call to a tracking server, a connection to a database, a look at a SQLite file), with a short timeout
and no retries, and names where the credentials came from (an environment variable's name, never its value).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import requests

from opsd_core.errors import OpsdError

# MLflow's client reads these (basic auth or a bearer token); only their names are ever shown
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class ServiceError(OpsdError):
    """A configured service does not answer, or refuses the credentials: nothing was started."""


@dataclass(frozen=True)
class Reach:
    """What a probe found: ``answers`` false with ``detail`` saying why (one line)."""

    service: str
    address: str
    answers: bool
    detail: str
    version: str | None = None
    credentials: str = "none"


def credentials_source(names: tuple[str, ...], env: dict[str, str] | None = None) -> str:
    """The names of the set variables among ``names`` ("none" if none is set); values are never read out."""
    env = os.environ if env is None else env
    found = [n for n in names if env.get(n)]
    return ", ".join(found) if found else "none"


def redact(address: str) -> str:
    """A URI without the password a user may have written into it (``scheme://user:secret@host``)."""
    scheme, sep, rest = address.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return address
    userinfo, _, host = rest.partition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def connect_failure(err: BaseException) -> str:
    """A failed connection in a few words (requests and urllib3 nest the socket's reason three levels deep)."""
    text = str(err)
    for needle, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "host name not resolved"),
                          ("Failed to resolve", "host name not resolved"), ("No route to host", "no route to host"),
                          ("Connection reset", "connection reset")):
        if needle in text:
            return words
    return (text.splitlines() or [type(err).__name__])[0][:160]


def _http_auth() -> dict[str, object]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"headers": {"Authorization": f"Bearer {token}"}}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return {"auth": (user, password or "")} if user else {}


def _probe_server(uri: str, timeout: float) -> Reach:
    base = uri.rstrip("/")
    creds = credentials_source(MLFLOW_CREDENTIALS)
    shown = redact(uri)
    try:
        health = requests.get(f"{base}/health", timeout=timeout)
        version = requests.get(f"{base}/version", timeout=timeout, **_http_auth())  # type: ignore[arg-type]
        # an authenticated call: /health answers everyone, even where the basic-auth app guards the rest
        probe = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 1},
                              timeout=timeout, **_http_auth())  # type: ignore[arg-type]
    except requests.RequestException as err:
        return Reach("mlflow", shown, False, f"cannot connect: {connect_failure(err)}", credentials=creds)
    ver = version.text.strip() if version.ok and len(version.text) < 40 else None
    if probe.status_code == 401:
        why = ("the server asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
               if creds == "none" else f"the server rejects the credentials in {creds}")
        return Reach("mlflow", shown, False, why, ver, creds)
    if probe.status_code == 403:
        return Reach("mlflow", shown, False, f"permission denied for the credentials in {creds}", ver, creds)
    if not health.ok or not probe.ok:
        code = probe.status_code if health.ok else health.status_code
        return Reach("mlflow", shown, False, f"answers HTTP {code} (is this an MLflow tracking server?)", ver, creds)
    return Reach("mlflow", shown, True, "answers", ver, creds)


def _probe_database(uri: str, timeout: float) -> Reach:
    import sqlalchemy

    shown = redact(uri)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout))},
                                          poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            version = str(conn.exec_driver_sql("SELECT version()").scalar() or "").split(" on ")[0]
    except Exception as err:  # noqa: BLE001 - a driver missing, a refused connection, bad credentials: one line
        return Reach("mlflow", shown, False, f"cannot connect: {connect_failure(err)}", credentials="in the URI"
                     if ":" in uri.partition("://")[2].partition("@")[0] else "none")
    return Reach("mlflow", shown, True, "answers", version or None)


def probe_tracking(uri: str, timeout: float = 5.0) -> Reach:
    """Probe the MLflow tracking store at ``uri`` (a server over HTTP(S), a database, a SQLite file)."""
    if uri.startswith(("http://", "https://")):
        return _probe_server(uri, timeout)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        where = path if path.exists() else path.parent
        ok = os.access(where if where.exists() else Path.cwd(), os.W_OK)
        detail = ("answers (a local SQLite file)" if path.exists() else "a new local SQLite file") if ok \
            else f"cannot write to {where}"
        return Reach("mlflow", uri, ok, detail)
    if uri.startswith(("postgresql", "mysql", "mssql")):
        return _probe_database(uri, timeout)
    return Reach("mlflow", redact(uri), True, "not probed (a scheme opsd does not check)")


def require_tracking(uri: str, timeout: float = 5.0) -> Reach:
    """:func:`probe_tracking`, raising :class:`ServiceError` (one line naming the store) unless it answers."""
    found = probe_tracking(uri, timeout)
    if not found.answers:
        raise ServiceError(f"the MLflow tracking store at {found.address} is not usable: {found.detail}; nothing "
                           "was started (registry.tracking_uri or MLFLOW_TRACKING_URI; `opsd doctor` checks "
                           "every service)")
    return found
