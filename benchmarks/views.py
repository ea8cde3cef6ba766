"""Screenshots of what a user opens after a run: the MLflow run and model version, the Prefect flow run.

Runs the main job (smoke profile) in a fresh project against the project's own Prefect server (`opsd server
start`, which serves the UI), starts `mlflow server` on the run's store, and takes headless Chromium
screenshots (Debian's `chromium`; `apt-get install chromium`) of:

* the MLflow pipeline run (``run.png``), its metrics (``run-metrics.png``), the registered model version
  (``version.png``) and the model list (``models.png``);
* the Prefect flow run (``flow-run.png``).

    python -m benchmarks.views --out /tmp/views [--keep]

Nothing is asserted: the pictures are for a person to look at (docs/figures.md says what was seen).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import fresh_smoke_clone
from opsd_core.net import answers, free_port

BIN = Path(sys.executable).parent


def shoot(url: str, out: Path, wait_ms: int = 20000) -> None:
    """A headless Chromium screenshot of ``url`` once its scripts have run for ``wait_ms`` (virtual time)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1500,1100", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the project folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="opsd-views-"))
    project = fresh_smoke_clone(work / "project", work / "models")
    opsd = [str(BIN / "opsd")]
    mlflow_server = None
    try:
        subprocess.run([*opsd, "server", "start"], cwd=project, check=True, timeout=300)
        subprocess.run([*opsd, "run"], cwd=project, check=True, timeout=1800)
        from flows import server as prefect_server

        prefect = prefect_server.status(project / ".opsd")
        assert prefect is not None
        db = project / ".opsd" / "mlflow.db"
        port = free_port()
        mlflow = f"http://127.0.0.1:{port}"
        mlflow_server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], cwd=project, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while not answers(f"{mlflow}/health"):
            if time.monotonic() > deadline:
                raise SystemExit("mlflow server did not answer in 180 s")
            time.sleep(1)

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        (version,) = client.search_model_versions("name='opsd-model'")
        pipeline = client.get_run(version.run_id)
        exp = pipeline.info.experiment_id
        # the model-training view, as the link `opsd run` prints opens it (MLflow 3.17 defaults to its GenAI view)
        view = "?workflowType=machine_learning"
        shoot(f"{mlflow}/#/experiments/{exp}/runs/{version.run_id}{view}", args.out / "run.png")
        shoot(f"{mlflow}/#/experiments/{exp}/runs/{version.run_id}/model-metrics{view}", args.out / "run-metrics.png")
        shoot(f"{mlflow}/#/models/opsd-model/versions/{version.version}", args.out / "version.png")
        shoot(f"{mlflow}/#/models", args.out / "models.png")
        flow_run = pipeline.data.tags.get("lineage.flow_run_id") or version.tags.get("lineage.flow_run_id")
        shoot(f"{prefect['url']}/runs/flow-run/{flow_run}", args.out / "flow-run.png")
    finally:
        if mlflow_server is not None:
            mlflow_server.terminate()
        subprocess.run([*opsd, "server", "stop"], cwd=project, timeout=120)
        if args.keep:
            print(f"project kept in {project}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
