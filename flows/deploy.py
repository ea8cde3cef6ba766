"""``opsd deploy``: the retrain flow on a cron schedule (scheduled retraining).

Without a work pool the flow is served from this process (``flow.serve``) against a Prefect server
with a scheduler: ``PREFECT_API_URL`` when set, else the project's own server (:mod:`flows.server`),
started here when it is not running. Prefect's temporary server has no scheduler, so a schedule there
would never fire. With ``flow.work_pool`` set, the deployment targets that pool and a worker on the pool
runs it from this project directory, or, with ``flow.source`` (a git URL), from a clone it makes for each run
on whatever machine it lives on (the flow then pulls the data version from the DVC remote).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect.client.schemas.schedules import CronSchedule
from prefect.runner.storage import GitRepository
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import ValidationError

from flows import server
from flows.retrain import retrain
from opsd_core.config import ConfigError, Params, load_params


def check_cron(cron: str) -> None:
    """A cron expression Prefect accepts, or a one-line :class:`ConfigError` (before any server starts)."""
    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ConfigError(f"--cron {cron!r} is not a cron expression (five fields: minute hour day month weekday, "
                          'e.g. "0 3 * * 1" for Mondays at 03:00)') from None


def deploy(params_path: str, profile: str | None, overrides: list[str] | None, cron: str, name: str,
           register_only: bool = False, state_dir: Path | None = None) -> int:
    """``state_dir``: where the project's Prefect server lives (None: use the configured API as it is)."""
    check_cron(cron)
    params = load_params(Path(params_path).resolve(), profile, overrides)
    if state_dir is None or params.flow.work_pool or os.environ.get("PREFECT_API_URL"):
        return _deploy(params_path, params, cron, name, register_only)
    record = server.start(state_dir)
    print(f"opsd deploy: the project's Prefect server at {record['url']} "
          f"({'already running' if record['already_running'] else 'started'}; `opsd server stop` stops it)",
          file=sys.stderr)
    with temporary_settings(updates={PREFECT_API_URL: record["api_url"]}):
        return _deploy(params_path, params, cron, name, register_only)


def _deploy(params_path: str, params: Params, cron: str, name: str, register_only: bool) -> int:
    params_file = Path(params_path).resolve()
    parameters = {"params_path": str(params_file)}
    # each run's own name carries its params and data hashes (flows/retrain.py: _run_name)
    labels = ["opsd", "scheduled", f"profile:{params.profile}"]
    if params.flow.work_pool:
        source: str | GitRepository = str(params_file.parent)
        if params.flow.source:  # each run clones the project where the worker is, and reads its params there
            source = GitRepository(url=params.flow.source, branch=params.flow.source_branch)
            parameters = {"params_path": params_file.name}
        deployment_id = retrain.from_source(source=source, entrypoint="flows/retrain.py:retrain").deploy(
            name=name, work_pool_name=params.flow.work_pool, cron=cron, parameters=parameters, tags=labels,
            build=False, push=False, print_next_steps=False)
        print(f"deployment opsd-retrain/{name} ({deployment_id}) on work pool {params.flow.work_pool!r}, "
              f"cron {cron!r}")
        return 0
    if register_only:
        deployment = retrain.to_deployment(name=name, cron=cron, parameters=parameters, tags=labels)
        deployment_id = deployment.apply()
        print(f"deployment opsd-retrain/{name} ({deployment_id}) registered, cron {cron!r}")
        return 0
    print(f"serving opsd-retrain/{name} on cron {cron!r} (Ctrl-C stops; the schedule pauses)", file=sys.stderr)
    retrain.serve(name=name, cron=cron, parameters=parameters, tags=labels)
    return 0
