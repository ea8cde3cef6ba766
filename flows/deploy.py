"""``opsd deploy``: the retrain flow on a cron schedule (scheduled retraining).

Without a work pool the flow is served from this process (``flow.serve``: Prefect's temporary
local server is enough). With ``flow.work_pool`` set, the deployment targets that pool and a
worker on the pool runs it from this project directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from opsd_core.config import ConfigError, load_params


def check_cron(cron: str) -> None:
    """A cron expression Prefect accepts, or a one-line :class:`ConfigError` (before any server starts)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ConfigError(f"--cron {cron!r} is not a cron expression (five fields: minute hour day month weekday, "
                          'e.g. "0 3 * * 1" for Mondays at 03:00)') from None


def deploy(params_path: str, profile: str | None, overrides: list[str] | None, cron: str, name: str,
           register_only: bool = False) -> int:
    check_cron(cron)
    from flows.retrain import retrain

    params_file = Path(params_path).resolve()
    params = load_params(params_file, profile, overrides)
    parameters = {"params_path": str(params_file)}
    if params.flow.work_pool:
        deployment_id = retrain.from_source(
            source=str(params_file.parent), entrypoint="flows/retrain.py:retrain",
        ).deploy(name=name, work_pool_name=params.flow.work_pool, cron=cron, parameters=parameters,
                 build=False, push=False, print_next_steps=False)
        print(f"deployment opsd-retrain/{name} ({deployment_id}) on work pool {params.flow.work_pool!r}, "
              f"cron {cron!r}")
        return 0
    if register_only:
        deployment = retrain.to_deployment(name=name, cron=cron, parameters=parameters)
        deployment_id = deployment.apply()
        print(f"deployment opsd-retrain/{name} ({deployment_id}) registered, cron {cron!r}")
        return 0
    print(f"serving opsd-retrain/{name} on cron {cron!r} (Ctrl-C stops; the schedule pauses)", file=sys.stderr)
    retrain.serve(name=name, cron=cron, parameters=parameters)
    return 0
