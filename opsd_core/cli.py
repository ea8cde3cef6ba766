"""``opsd`` command line: parse arguments, load params, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from opsd_core.capabilities import CapabilityError
from opsd_core.config import ConfigError, Params, load_params

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # transformers' per-load "Loading weights" bars drown the training log; opsd's own bars stay
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


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
    run = sub.add_parser("run", help="the main job: generate data if needed, run the retrain flow")
    _common(run)
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
    """``opsd train`` with ``train.nproc`` > 1: the same command as ``nproc`` processes under torchrun."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "opsd_core.cli", *argv]
    return subprocess.call(cmd)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    params = _load(args)
    root = Path(args.params).resolve().parent if Path(args.params).exists() else Path.cwd()
    if args.command == "env":
        from opsd_core.environment import render, report

        record = report(params)
        print(json.dumps(record, indent=2, sort_keys=True) if args.json else render(record, params))
        return 2 if "plan_error" in record else 0
    if args.command == "data":
        from opsd_core.data import generate_raw

        path = generate_raw(params.data.generate, root)
        print(f"wrote {path}")
        return 0
    if args.command == "train" and params.train.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch(params.train.nproc, argv)
    if args.command in ("prepare", "train", "evaluate"):
        from opsd_core import stages  # torch and transformers: only the commands that compute pay for them

        if args.command == "evaluate":
            stages.evaluate(params, root, args.model)
        elif args.command == "prepare":
            _print(stages.prepare(params, root))
        else:
            summary = stages.train(params, root)
            if summary is not None:  # rank 0 (or the only process) reports
                _print(summary)
        return 0
    if args.command in ("register", "promote", "status"):
        from opsd_core import registry

        if args.command == "register":
            _print(registry.register(params, root))
        elif args.command == "promote":
            if not args.rollback:
                raise ConfigError("promote: only --rollback is supported; promotion goes through the gate")
            _print(registry.rollback(params, root))
        else:
            print(registry.render_status(registry.status(params, root)))
        return 0
    if args.command == "run":
        from flows.retrain import main_job

        return main_job(args.params, args.profile, args.overrides)
    if args.command == "deploy":
        from flows.deploy import deploy

        return deploy(args.params, args.profile, args.overrides, args.cron, args.name, args.register_only)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except (ConfigError, CapabilityError) as err:
        print(f"opsd: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a clear one-line error; tracebacks on request
        if os.environ.get("OPSD_DEBUG"):
            raise
        name = type(err).__name__
        if name in {"DataError", "BundledDataError", "TrainingError", "EvalError", "EvalDataError",
                    "EvalTaskError", "RegistryError", "ModelSourceError", "StageError", "FileNotFoundError"}:
            print(f"opsd {args.command}: {name}: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
