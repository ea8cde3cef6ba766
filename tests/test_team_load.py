"""Load on a team's servers: four pipelines from four clones (four machines) at once against one tracking
server on PostgreSQL with S3 artifacts, one Prefect server on PostgreSQL and one S3 DVC remote.

Each clone has its own state folder, model cache and training seed (different weights), and runs the main job
(`opsd run`, smoke profile). Afterwards: every run is recorded, every candidate registered once, the champion is
the end of one unbroken chain of gate-decided moves, each promotion was compared against the champion it
replaced, and the registry's record of the moves holds every machine's audit entry.

Minutes of four pipelines on two cores: marked ``load``, out of ``make test`` (the suite's time budget) and run by
``make test-load``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.common import fresh_smoke_clone
from opsd_core.registry.audit import read_audit, registry_audit
from tests.servers import (
    BIN,
    S3_ENV,
    free_port,
    postgres,
    postgres_or_skip,
    s3_endpoint,
    serve_mlflow,
    serve_prefect,
)

pytestmark = [pytest.mark.slow, pytest.mark.load]

MACHINES = 4
MODEL = "load-model"


def _clone(path: Path, seed: int, s3: str) -> Path:
    fresh_smoke_clone(path, path / "models", with_dvc_config=True)  # a model cache of its own, as on a machine
    tree = yaml.safe_load((path / "params.yaml").read_text())
    tree["train"]["seed"] = seed
    tree["registry"]["model_name"] = MODEL
    (path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    for cmd in (["remote", "add", "-f", "-d", "team", "s3://dvc-store/load"], ["remote", "modify", "team",
                                                                                "endpointurl", s3]):
        subprocess.run([str(BIN / "dvc"), *cmd], cwd=path, check=True, capture_output=True, timeout=120)
    return path


def test_four_pipelines_at_once_leave_one_champion_at_the_end_of_an_unbroken_audited_chain(tmp_path: Path) -> None:
    postgres_or_skip()
    with postgres() as pg, s3_endpoint(tmp_path, ("mlflow-artifacts", "dvc-store")) as s3:
        s3_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
        with serve_mlflow(tmp_path, free_port(), backend=pg.url(pg.create_db("mlflow"), "psycopg"),
                          artifacts="s3://mlflow-artifacts/mlflow", env=s3_env) as mlflow_url, \
                serve_prefect(tmp_path, pg.url(pg.create_db("prefect"), "asyncpg")) as api:
            env = {**os.environ, **S3_ENV, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": api,
                   "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
            for key in ("OPSD_MLFLOW_RUN_ID", "PREFECT_API_AUTH_STRING"):
                env.pop(key, None)
            clones = [_clone(tmp_path / f"machine{i}", i + 1, s3) for i in range(MACHINES)]
            began = time.monotonic()
            procs = [subprocess.Popen([str(BIN / "opsd"), "run"], cwd=c, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for c in clones]
            done = [p.communicate(timeout=1800) for p in procs]
            print(f"{MACHINES} pipelines at once took {time.monotonic() - began:.0f} s")
            assert [p.returncode for p in procs] == [0] * MACHINES, [err[-3000:] for _, err in done]

            from mlflow import MlflowClient

            client = MlflowClient(mlflow_url, mlflow_url)
            versions = client.search_model_versions(f"name='{MODEL}'")
            hashes = [v.tags["content_hash"] for v in versions]
            assert len(versions) == MACHINES and len(set(hashes)) == MACHINES  # each candidate once
            flows = {v.tags["lineage.flow_run_id"] for v in versions}
            assert len(flows) == MACHINES and "None" not in flows  # each from its own flow run
            runs = [client.get_run(v.run_id) for v in versions]
            assert all(r.info.status == "FINISHED" for r in runs)
            moves = registry_audit(client, MODEL)
            local = [e for c in clones for e in read_audit(c / ".opsd", MODEL)]
            as_key = [json.dumps(e, sort_keys=True) for e in moves]
            assert sorted(as_key) == sorted(json.dumps(e, sort_keys=True) for e in local)  # no entry lost
            assert len(set(as_key)) == len(as_key)
            champion_moves = sorted((e for e in moves if e["alias"] == "champion"),
                                    key=lambda e: int(e["lease_ticket"]))
            promoted = {str(v.version): json.loads(v.tags["gate.verdict"]) for v in versions
                        if v.tags["gate.promote"] == "true"}
            assert sorted(e["to_version"] for e in champion_moves) == sorted(promoted)  # every promotion, once
            for move in champion_moves:  # the gate compared each winner with the champion it then replaced
                seen = promoted[move["to_version"]]["checks"]["vs_champion"].get("champion_version")
                assert seen == move["from_version"]
            assert champion_moves, "no candidate passed the gate: the chain was not exercised"
            assert champion_moves[0]["from_version"] is None
            for prev, nxt in zip(champion_moves, champion_moves[1:], strict=False):
                assert nxt["from_version"] == prev["to_version"]  # each move decided on the one before it
            assert str(client.get_model_version_by_alias(MODEL, "champion").version) == champion_moves[-1]["to_version"]
            # every registration moved `challenger` on from the one before it, in the server's ticket order
            challenger_moves = sorted((e for e in moves if e["alias"] == "challenger"),
                                      key=lambda e: int(e["lease_ticket"]))
            assert len(challenger_moves) == MACHINES and challenger_moves[0]["from_version"] is None
            for prev, nxt in zip(challenger_moves, challenger_moves[1:], strict=False):
                assert nxt["from_version"] == prev["to_version"]
            print(f"champion v{champion_moves[-1]['to_version']} after {len(champion_moves)} promotion(s); "
                  f"challenger chain {' -> '.join(e['to_version'] for e in challenger_moves)}")
