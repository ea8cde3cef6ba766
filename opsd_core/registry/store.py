"""Where the registry lives: tracking-URI resolution, client, experiment, version downloads.

The embedded default keeps everything inside the project's state folder (``<state_dir>/mlflow.db`` and
``<state_dir>/mlartifacts``) so that a checkout never writes MLflow files to the working directory.
Any other tracking URI comes from ``params.registry.tracking_uri`` or ``$MLFLOW_TRACKING_URI``: a SQLite
file keeps its artifacts beside it, a server (or PostgreSQL, ...) keeps its own artifact root.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opsd_core.config import Params
from opsd_core.errors import OpsdError
from opsd_core.layout import Layout

if TYPE_CHECKING:  # mlflow costs ~2 s to import: only the functions that talk to it import it
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


LOCK_FILE = "registry.lock"


class RegistryError(OpsdError, RuntimeError):
    """A registry operation that cannot go ahead (missing input, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_location: str | None  # for new experiments; None: the tracking server decides
    state_dir: Path

    def exists(self) -> bool:
        """False for a SQLite store whose file is not there yet (opening it would create it); True otherwise."""
        if self.tracking_uri.startswith("sqlite:///") and self.tracking_uri != "sqlite:///:memory:":
            return Path(self.tracking_uri.removeprefix("sqlite:///")).is_file()
        return True


def state_dir(params: Params, root: Path) -> Path:
    return Layout.of(params, root).state


def resolve_store(params: Params, root: Path) -> Store:
    """params.registry.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite in the state folder.

    A relative ``sqlite:///name.db`` resolves against the working directory, as MLflow does.
    """
    state = state_dir(params, root)
    uri = params.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"
    artifacts = None
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        # MLflow's default for a database store is ./mlruns in the working directory: keep the
        # artifacts beside the database file instead
        artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return Store(tracking_uri=uri, artifact_location=artifacts, state_dir=state)


@contextmanager
def registry_lock(state: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``<state>/registry.lock`` (blocks; freed if the holder dies).

    Serialises alias moves (read champion -> gate -> move) and the creation of a new SQLite store,
    whose schema migration is not safe to run twice at once. It protects processes sharing this
    folder (one machine or a shared file system), not clients of a remote server on other machines.
    """
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def open_client(store: Store) -> MlflowClient:
    from mlflow import MlflowClient

    with registry_lock(store.state_dir):  # the client creates (and migrates) a SQLite store eagerly
        # explicit registry URI: MLflow would otherwise fall back to ./mlflow.db for registry calls
        return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


# MLflow 3's UI opens an experiment without this tag in its GenAI mode (a Traces page, runs filed under
# "Evaluation runs"); opsd's runs are model training: the runs view with metrics and the model registry
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client: MlflowClient, store: Store, name: str) -> str:
    """Experiment id; a new experiment on a SQLite store keeps its artifacts beside the database. The
    experiment is marked as model development for MLflow's UI (also one an older opsd created)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=store.artifact_location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by a racing process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ensure_registered_model(client: MlflowClient, name: str,
                            description: str = "OPSD candidates (peft adapters on their base model); see each "
                                               "model card.", tags: dict[str, str] | None = None) -> None:
    """Create the registered model ``name`` unless it exists (or a racing pipeline creates it meanwhile)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description=description, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created meanwhile by a racing pipeline
                raise


def registered_model_exists(client: MlflowClient, name: str) -> bool:
    """Whether ``name`` is registered. Ask before reading an alias: MLflow's basic-auth app answers 403, not
    404, for an alias of a model that does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise
    return True


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name`` (paginated); tag filters are done here, not by the backend."""
    out: list[ModelVersion] = []
    token: str | None = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def find_by_content_hash(client: MlflowClient, name: str, content_hash: str) -> ModelVersion | None:
    matches = [v for v in all_versions(client, name) if v.tags.get("content_hash") == content_hash]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def download_version(client: MlflowClient, name: str, version: str, dst: Path) -> Path:
    """Download a version's files to ``dst``; returns the local folder of the candidate as trained (the
    adapter, or full weights): ``artifacts/candidate`` inside the MLflow model folder (registry/pyfunc.py)."""
    import mlflow.artifacts

    # resolved through this client: MLflow's models:/ resolution ignores an explicit registry URI
    uri = client.get_model_version_download_uri(name, version)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                     tracking_uri=client.tracking_uri))
    return local / "artifacts" / "candidate" if (local / "MLmodel").is_file() else local
