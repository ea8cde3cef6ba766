"""The ``opsd`` app entry: parse the command line, load params, call one stage or flow.

The only module where the library (``opsd_core``) and the orchestrator (``flows``, Prefect) meet; Prefect is
imported only by ``opsd run`` and ``opsd deploy``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from opsd_core.backends.capabilities import apply_isa_cap
from opsd_core.config import ConfigError, Params, load_params
from opsd_core.errors import OpsdError
from opsd_core.layout import Env
from opsd_core.offline import apply_offline_defaults


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile in params.yaml: default, smoke, gpu, ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter (repeatable; value parsed as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd", description="On-Policy Self-Distillation pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="bundled data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    _common(data_sub.add_parser("generate", help="write the bundled raw dataset (reasoning-gym)"))

    _common(sub.add_parser("prepare", help="validate, verify, dedupe, decontaminate and split traces"))
    _common(sub.add_parser("train", help="OPSD training; resumes from the last checkpoint"))
    _common(sub.add_parser("diagnose", help="the self-teacher gap: how much the verified solution in the context "
                                            "helps the model before training (what OPSD distils)"))
    ev = sub.add_parser("evaluate", help="lm-eval: base and candidate side by side")
    _common(ev)
    ev.add_argument("--model", choices=["base", "candidate"], default="candidate",
                    help="base: evaluate the base model only (cached); candidate: compare with the base")
    _common(sub.add_parser("register", help="MLflow run, model version and promotion gate"))
    promote = sub.add_parser("promote", help="move the champion alias")
    _common(promote)
    promote.add_argument("--rollback", action="store_true", help="restore the previous champion")
    _common(sub.add_parser("status", help="champion, challenger, scores and lineage"))
    env = sub.add_parser("env", help="this machine's capabilities, the paths a run would take, library versions")
    _common(env)
    env.add_argument("--json", action="store_true", help="print the record as JSON")
    doctor = sub.add_parser("doctor", help="the services this project uses (MLflow, Prefect, DVC remote): whether "
                                           "each answers, versions, where the credentials come from")
    _common(doctor)
    doctor.add_argument("--json", action="store_true", help="print the probes as JSON")
    run = sub.add_parser("run", help="the main job: generate data if needed, run the retrain flow")
    _common(run)
    server = sub.add_parser("server", help="the project's persistent Prefect server (needed for schedules)")
    _common(server)
    server.add_argument("action", choices=["start", "stop", "status"])
    deploy = sub.add_parser("deploy", help="serve the retrain flow on a cron schedule")
    _common(deploy)
    deploy.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1"')
    deploy.add_argument("--name", default="opsd-retrain", help="deployment name")
    deploy.add_argument("--register-only", action="store_true",
                        help="register the deployment and exit instead of serving it")
    return parser


def _load(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.profile, args.overrides)


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _relaunch(nproc: int, argv: list[str]) -> int:
    """``opsd train`` with ``train.nproc`` > 1: the same command as ``nproc`` processes under torchrun (each rank
    runs :func:`main` too, and inherits this process's environment)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "flows.cli", *argv]
    return subprocess.call(cmd)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    params = _load(args)
    root = Path(args.params).resolve().parent if Path(args.params).exists() else Path.cwd()
    if args.command == "env":
        from opsd_core.backends.environment import render, report

        record = report(params)
        print(json.dumps(record, indent=2, sort_keys=True) if args.json else render(record, params))
        return 2 if "plan_error" in record else 0
    if args.command == "doctor":
        from flows.doctor import doctor

        text, code = doctor(params, root, args.json)
        print(text)
        return code
    if args.command == "data":
        from opsd_core.data import generate_raw

        path = generate_raw(params.data.generate, root)
        print(f"wrote {path}")
        return 0
    if args.command == "train" and params.train.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch(params.train.nproc, argv)
    if args.command == "diagnose":
        from opsd_core.stages.diagnose import diagnose

        diagnose(params, root)  # prints its table; reports/diagnosis.json holds the figures
        return 0
    if args.command in ("prepare", "train", "evaluate"):
        # torch and transformers: only the commands that compute pay for them
        if args.command == "evaluate":
            from opsd_core.stages.evaluate import evaluate

            evaluate(params, root, args.model)
        elif args.command == "prepare":
            from opsd_core.stages.prepare import prepare

            _print(prepare(params, root))
        else:
            from opsd_core.stages.train import train

            summary = train(params, root)
            if summary is not None:  # rank 0 (or the only process) reports
                _print(summary)
        return 0
    if args.command in ("register", "promote", "status"):
        from opsd_core.registry.reach import require_tracking
        from opsd_core.registry.store import resolve_store

        uri = resolve_store(params, root).tracking_uri
        if uri.startswith(("http://", "https://")):  # a server: one line in seconds, not minutes of retries
            require_tracking(uri)
        if args.command == "register":
            from opsd_core.stages.register import register

            _print(register(params, root))
        elif args.command == "promote":
            from opsd_core.stages.promote import rollback

            if not args.rollback:
                raise ConfigError("promote: only --rollback is supported; promotion goes through the gate")
            _print(rollback(params, root))
        else:
            from opsd_core.stages.status import render_status, status

            print(render_status(status(params, root)))
        return 0
    if args.command == "run":
        if (args.profile and args.profile != load_params(args.params).profile) or args.overrides:
            raise ConfigError(
                "run: the pipeline reads params.yaml (DVC tracks it), so --profile/--set would be invisible to "
                "its stages. Set `profile:` or the keys in params.yaml instead, or run a single stage "
                "(`opsd train --profile ...`)")
        # one line naming the store, in seconds, before torch or Prefect is imported: not MLflow's minutes of
        # retries and chained tracebacks (the flow checks again: a worker's run starts there)
        from opsd_core.registry.reach import require_tracking
        from opsd_core.registry.store import resolve_store

        require_tracking(resolve_store(params, root).tracking_uri)
        from flows.doctor import prefect_api, require_prefect

        api, _ = prefect_api(root / params.registry.state_dir)
        if api is not None:  # PREFECT_API_URL or the project's own server; else a temporary one is started
            require_prefect(api)
        from opsd_core.stages.train import execution_plan

        execution_plan(params)  # a setting this machine cannot honour fails now, not in the train stage
    state = root / params.registry.state_dir
    if args.command == "server":
        from flows import server

        if args.action == "start":
            record = server.start(state)
            print(f"Prefect server {'already running' if record['already_running'] else 'started'} at {record['url']} "
                  f"(pid {record['pid']}, state {record['home']}, log {record['log']})")
        elif args.action == "stop":
            record = server.stop(state)
            print(f"Prefect server at {record['url']} stopped" if record else "no Prefect server running")
        else:
            record = server.status(state)
            print(f"Prefect server at {record['url']} (pid {record['pid']})" if record else "no Prefect server running")
            return 0 if record else 1
        return 0
    if args.command == "run" and not os.environ.get("PREFECT_API_URL"):
        from flows import server

        # the project's own server when it runs (the run's history then shows in its UI), else Prefect's
        # temporary one; set before Prefect is imported, which reads its settings once
        record = server.status(state)
        if record is not None:
            os.environ["PREFECT_API_URL"] = record["api_url"]

    if args.command in ("run", "deploy"):
        from flows.server import prefect_home

        # Prefect's history (flow runs, logs, artifacts) belongs to this project, not to ~/.prefect shared by
        # every clone; set before Prefect is imported, which reads its settings once
        home = Path(os.environ.setdefault("PREFECT_HOME", str(prefect_home(state))))
        home.mkdir(parents=True, exist_ok=True)
        # the terminal shows flows/console.py's lines; Prefect's own records (every stage line, with its
        # 60-character prefix) go to the run's log in Prefect, and to the terminal only from WARNING up
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    if args.command == "run":
        from flows.retrain import main_job

        return main_job(args.params)
    if args.command == "deploy":
        from flows.deploy import deploy

        return deploy(args.params, args.profile, args.overrides, args.cron, args.name, args.register_only,
                      state_dir=state)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    apply_isa_cap()  # before torch runs a kernel: oneDNN and MKL read their caps once, on first use
    apply_offline_defaults()
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except OpsdError as err:
        if os.environ.get(Env.DEBUG):
            raise
        # a setting error is the user's to fix before anything runs; the others name the stage
        prefix = "opsd" if err.exit_code == 2 else f"opsd {args.command}: {type(err).__name__}"
        print(f"{prefix}: {err}", file=sys.stderr)
        return err.exit_code
    except Exception:
        print(f"opsd {args.command}: an internal error (a bug in opsd, not in your data or settings); "
              "please report it with the traceback below", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
