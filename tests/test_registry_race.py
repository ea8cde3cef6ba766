"""Promotions racing from separate state folders (as from separate machines) through one real `mlflow server`.

The local registry lock cannot serialise these pipelines: only the server-side promotion lease
(opsd_core/registry/promotion_lease.py) does. Without it, two pipelines read the same champion, both move
it, and the chain of champion moves forks (and the alias_history tags lose entries).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from opsd_core.config import Params
from opsd_core.registry.audit import read_audit
from opsd_core.registry.promotion_lease import LeaseLostError, acquire, lease_model, promotion_lease
from tests.servers import free_port, postgres, postgres_or_skip, serve_mlflow
from tests.support import eval_report, registry_project, tiny_llama

pytestmark = pytest.mark.slow  # an MLflow server and racing processes: out of the fast lane (make test-fast)

REPO = Path(__file__).resolve().parents[1]
SCORES = (20, 35, 30)  # a higher score beats every lower one, so serialised promotions only climb


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server_and_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real `mlflow server` on 127.0.0.1 (its store on SQLite, or on a real PostgreSQL: what a team runs)
    and a tiny base model, built while the server starts."""
    with contextlib.ExitStack() as stack:
        backend = None
        if request.param == "postgresql":
            postgres_or_skip()
            cluster = stack.enter_context(postgres())
            backend = cluster.url(cluster.create_db("mlflow"), "psycopg")
        serving = serve_mlflow(tmp_path_factory.mktemp("server"), free_port(), backend=backend)
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(serving.__enter__)
            base = tiny_llama(tmp_path_factory.mktemp("base"))
            url = started.result()
        stack.callback(serving.__exit__, None, None, None)
        yield url, base


def _client(url: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


_WORKER = """
import json, sys
from pathlib import Path
from opsd_core.config import Params
from opsd_core.stages.register import register
import matplotlib.pyplot, mlflow  # pay the imports before the start signal so the processes really race
params = Params.model_validate(json.loads(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(register(params, Path(sys.argv[1]))), flush=True)
"""


@pytest.mark.slow
def test_racing_promotions_from_separate_state_folders_leave_one_champion_and_a_complete_audit(
    server_and_base: tuple[str, Path], tmp_path: Path,
) -> None:
    server, base_dir = server_and_base
    model = "race-model"
    params = Params(registry={"model_name": model}, eval={"bootstrap_samples": 200})
    roots = [tmp_path / f"machine{i}" for i in range(len(SCORES))]  # each its own .opsd state folder
    for i, (root, score) in enumerate(zip(roots, SCORES, strict=True)):
        registry_project(root, base_dir, seed=i + 1, report=eval_report(cand=score))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": server}
    env.pop("OPSD_MLFLOW_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), params.model_dump_json()], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in roots]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    done = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in done]
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in done]

    client = _client(server)
    versions = [str(v) for v in range(1, len(SCORES) + 1)]
    assert sorted(o["version"] for o in outs) == versions
    by_score = {score: o["version"] for score, o in zip(SCORES, outs, strict=True)}
    champion = str(client.get_model_version_by_alias(model, "champion").version)
    assert champion == by_score[max(SCORES)]  # serialised promotions only climb, so the best one ends on top

    # the audit trail of all the state folders, merged in the order the server handed out lease tickets
    entries = [e for root in roots for e in read_audit(root / ".opsd", model)]
    assert all(e["lease_ticket"] is not None for e in entries)
    keys = [(e["alias"], e["to_version"], e["action"], e["actor"]) for e in entries]
    assert len(set(keys)) == len(keys)  # nothing recorded twice
    assert Counter(e["alias"] for e in entries if e["action"] == "register") == {"challenger": len(SCORES)}
    promoted = sorted(o["version"] for o in outs if o["promoted"])
    champ_moves = sorted((e for e in entries if e["alias"] == "champion"), key=lambda e: int(e["lease_ticket"]))
    assert sorted(e["to_version"] for e in champ_moves) == promoted  # every promotion recorded, once
    assert champ_moves[0]["from_version"] is None
    for prev, nxt in zip(champ_moves, champ_moves[1:], strict=False):
        assert nxt["from_version"] == prev["to_version"]  # each move decided on the move before it
    assert champ_moves[-1]["to_version"] == champion  # the alias is what the last compare-and-set decided
    for o in outs:  # each gate compared against the champion it then moved away from
        if o["promoted"]:
            seen = o["verdict"]["checks"]["vs_champion"].get("champion_version")
            assert seen == next(e for e in champ_moves if e["to_version"] == o["version"])["from_version"]

    # the registry's own copy of the trail (alias_history tags) lost no entry to a concurrent rewrite
    for version in versions:
        tagged = json.loads(client.get_model_version(model, version).tags["alias_history"])
        local = [e for e in entries if version in (e["from_version"], e["to_version"])]
        assert sorted(json.dumps(e, sort_keys=True) for e in tagged) == sorted(
            json.dumps(e, sort_keys=True) for e in local)
    assert client.search_model_versions(f"name='{lease_model(model)}'") == []  # every ticket released


def test_a_dead_holder_blocks_for_one_ttl_and_a_stalled_holder_moves_nothing(
    server_and_base: tuple[str, Path],
) -> None:
    client = _client(server_and_base[0])
    dead = acquire(client, "lease-model", "dead holder", ttl_s=1.0)  # never released: its process "died"
    start = time.monotonic()
    with promotion_lease(client, "lease-model", "next holder", ttl_s=30) as lease:
        waited = time.monotonic() - start
        assert int(lease.ticket) > int(dead.ticket)
        lease.confirm()  # holds, and is still held
    assert 0.9 <= waited < 10
    assert client.search_model_versions(f"name='{lease_model('lease-model')}'") == []  # the dead ticket removed

    stalled = acquire(client, "lease-model", "stalled holder", ttl_s=1.0)
    time.sleep(0.6)  # more than half its TTL without a beat: another pipeline may have taken over
    with pytest.raises(LeaseLostError, match="stalled"):
        stalled.confirm()
    stalled.release()
