"""``opsd doctor``: the services this project is wired to, whether each answers, with which credentials.

One line per service: the MLflow tracking store, the MLflow model registry's artifact store as the server
reports it, the Prefect API (a server from ``PREFECT_API_URL``, the project's own ``opsd server``, or the
temporary one each ``opsd run`` starts), and DVC's remote. Credentials are shown by the name of the variable
or file that holds them, never by value. Each probe has a short timeout and no retries: a dead service is
reported in seconds, not after a client's minutes of back-off.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import requests

from flows import server
from opsd_core.config import Params
from opsd_core.registry.reach import (
    Reach,
    ServiceError,
    connect_failure,
    credentials_source,
    probe_tracking,
    redact,
)
from opsd_core.registry.store import resolve_store

PREFECT_CREDENTIALS = ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")


def prefect_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    """The header Prefect's client sends: basic auth from PREFECT_API_AUTH_STRING, or a bearer API key."""
    env = os.environ if env is None else env
    if env.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()}
    if env.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {env['PREFECT_API_KEY']}"}
    return {}


def prefect_api(state: Path) -> tuple[str | None, str]:
    """(the API URL a run would use, where it comes from); None: Prefect's temporary per-run server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    record = server.status(state)
    if record is not None:
        return record["api_url"], "opsd server"
    return None, "temporary"


def probe_prefect(api: str, timeout: float = 5.0) -> Reach:
    creds = credentials_source(PREFECT_CREDENTIALS)
    base = api.rstrip("/")
    try:
        health = requests.get(f"{base}/health", headers=prefect_headers(), timeout=timeout)
        version = requests.get(f"{base}/admin/version", headers=prefect_headers(), timeout=timeout)
    except requests.RequestException as err:
        return Reach("prefect", redact(api), False, f"cannot connect: {connect_failure(err)}", credentials=creds)
    # /health answers everyone, even where PREFECT_SERVER_API_AUTH_STRING guards the rest: the version call
    # is the one that says whether the credentials are accepted
    if 401 in (health.status_code, version.status_code):
        why = ("the server asks for credentials: set PREFECT_API_AUTH_STRING" if creds == "none"
               else f"the server rejects the credentials in {creds}")
        return Reach("prefect", redact(api), False, why, credentials=creds)
    if not health.ok:
        return Reach("prefect", redact(api), False, f"answers HTTP {health.status_code}", credentials=creds)
    ver = version.json() if version.ok else None
    return Reach("prefect", redact(api), True, "answers", str(ver) if ver else None, creds)


def require_prefect(api: str, timeout: float = 5.0) -> None:
    """:func:`probe_prefect`, raising :class:`ServiceError` (one line naming the server) unless it answers."""
    found = probe_prefect(api, timeout)
    if not found.answers:
        raise ServiceError(f"the Prefect API at {found.address} is not usable: {found.detail}; nothing was started "
                           "(PREFECT_API_URL; `opsd doctor` checks every service)")


def _within(fn: Callable[[], Reach], timeout: float, fallback: Reach) -> Reach:
    """``fn()`` if it returns within ``timeout`` seconds, else ``fallback`` (the thread is left to end alone:
    an object store's client may retry a dead endpoint for a minute)."""
    out: list[Reach] = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    return out[0] if out else fallback


def probe_dvc_remote(root: Path, name: str | None, timeout: float = 15.0) -> Reach:
    """DVC's remote ``name`` (None: the default one) through DVC's own file system for it."""
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except Exception as err:  # noqa: BLE001 - not a DVC project, a broken config: one line
        return Reach("dvc remote", str(root), False, f"no DVC project: {str(err).splitlines()[0][:160]}")
    with repo:
        remote_name = name or repo.config["core"].get("remote")
        if not remote_name:
            return Reach("dvc remote", "-", True, "none configured (data stays in this clone's cache)")
        settings = repo.config["remote"].get(remote_name, {})
        url = str(settings.get("url", ""))
        creds = "dvc config" if any(k in settings for k in ("access_key_id", "credentialpath", "profile")) \
            else credentials_source(S3_CREDENTIALS) if url.startswith("s3://") else "none"
        address = f"{remote_name}: {url}" + (f" at {settings['endpointurl']}" if settings.get("endpointurl") else "")

        def look() -> Reach:
            try:
                remote = repo.cloud.get_remote(remote_name)
                remote.fs.exists(remote.path)
            except Exception as err:  # noqa: BLE001 - whatever the object store's client raises: one line
                return Reach("dvc remote", address, False, f"cannot reach: {connect_failure(err)}",
                             credentials=creds)
            return Reach("dvc remote", address, True, "answers", credentials=creds)

        return _within(look, timeout, Reach("dvc remote", address, False, f"no answer in {timeout:.0f} s",
                                            credentials=creds))


def services(params: Params, root: Path, timeout: float = 5.0) -> list[Reach]:
    """Every service a run of this project would use, probed."""
    store = resolve_store(params, root)
    found = [probe_tracking(store.tracking_uri, timeout)]
    api, source = prefect_api(store.state_dir)
    if api is None:
        found.append(Reach("prefect", "temporary server per run", True, "started by each `opsd run`"))
    else:
        reach = probe_prefect(api, timeout)
        found.append(replace(reach, address=f"{reach.address} ({source})"))
    found.append(probe_dvc_remote(root, params.flow.dvc_remote, max(timeout, 10.0)))
    return found


def render(found: list[Reach]) -> str:
    rows = [("service", "address", "state", "version", "credentials")]
    rows += [(r.service, r.address, ("ok: " if r.answers else "FAILED: ") + r.detail, r.version or "-",
              r.credentials) for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row))
                     for row in rows)


def doctor(params: Params, root: Path, as_json: bool = False) -> tuple[str, int]:
    """(what to print, exit code: 0 when every configured service answers, 1 otherwise)."""
    found = services(params, root)
    text = json.dumps([asdict(r) for r in found], indent=2) if as_json else render(found)
    return text, 0 if all(r.answers for r in found) else 1
