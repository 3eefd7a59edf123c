"""The life of an MLflow run: one per variant stage, one parent ``pipeline`` run per report.

:func:`tracked_run` opens either kind with the same tags (git commit, DVC experiment name, host
and process), logs the flat params, and always ends the run: FINISHED, or FAILED on any
exception (SIGTERM included: stages turn it into an exception). A run that a killed process
left RUNNING is ended as KILLED by the next run opened on the same host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from foodtransfer.atomic import process_alive
from foodtransfer.errors import ServerLostError, TrackingError
from foodtransfer.tracking.store import (_fail_fast_http, connect, project_root, retry_on_lock,
                                         tracking_uri)

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG = "host", "pid"  # where a run's process runs: to find runs left RUNNING
PIPELINE_RUN_NAME = "pipeline"
RUN_KIND_TAG = "run_kind"  # "variant" or "pipeline"
PIPELINE_TAG = "pipeline_run_id"  # on a variant run: the pipeline run it belongs to
PARENT_TAG = "mlflow.parentRunId"  # MLflow's UI nests a run under the run this tag names
NOTE_TAG = "mlflow.note.content"  # MLflow's UI shows this tag as the run's description
WORKER_ENV = "FOODTRANSFER_WORKER"  # the sweep worker that ran this execution (tag worker)
# Whether a stage's DVC outputs landed: "pending" while the run is open and until its files
# are renamed into place (after the run ended FINISHED), then "published"; "lost" when its
# process died in between (set by the next run on this host). Runs without it are older.
OUTPUTS_TAG = "outputs"
PENDING, PUBLISHED, LOST = "pending", "published", "lost"


def git_commit(root: Path) -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version(stages: list[str] | None = None, root: Path | None = None) -> str:
    """A short hash of the code that produced a run's numbers, in the tree the stage runs in
    (the working directory: DVC runs a stage at its tree's root, a queued or temporary copy
    included). With ``stages``: exactly the code deps dvc.yaml lists for them and for every
    stage upstream (what DVC hashes), so an edit to code no such stage imports (the demo,
    compare) changes nothing. Without, or outside a DVC project: every ``*.py`` of the
    package and of ``pipeline/``."""
    import hashlib

    import foodtransfer
    from foodtransfer.dag import code_version as stages_code_version

    root = root or Path.cwd()
    if stages:
        version = stages_code_version(root, stages)
        if version is not None:
            return version
    package = root / "src" / "foodtransfer"
    if not package.is_dir():
        package = Path(foodtransfer.__file__).parent
    files = sorted(package.rglob("*.py")) + sorted((root / "pipeline").glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_path() -> str:
    """The folder of the ``foodtransfer`` package this process runs: the tree's own ``src/``
    (a DVC queue's or --temp copy included), whatever ``pip install -e`` points at."""
    import foodtransfer

    return str(Path(foodtransfer.__file__).resolve().parent)


class TrackedRun:
    """Logging to one open MLflow run; every call retries on SQLite's lock."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_epoch(self, row: dict[str, float]) -> None:
        import mlflow

        step = int(row["epoch"])
        values = {key: float(value) for key, value in row.items() if key != "epoch"}
        retry_on_lock(mlflow.log_metrics)(values, step=step)

    def log_metrics(self, values: dict[str, float]) -> None:
        import mlflow

        retry_on_lock(mlflow.log_metrics)({k: float(v) for k, v in values.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        retry_on_lock(mlflow.log_artifact)(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        retry_on_lock(mlflow.set_tags)(tags)

    def describe(self, text: str) -> None:
        """The run's description in MLflow's UI (markdown)."""
        self.set_tags({NOTE_TAG: text[:7900]})

    def log_split_manifests(self, split_dir: Path, data_version: str) -> None:
        """The split manifests as MLflow datasets (the UI's Datasets column and run page):
        ``train-<data version>`` (context training), ``val-...`` (validation), ``test-...``."""
        import warnings

        import mlflow
        import pandas as pd

        for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
            frame = pd.read_csv(split_dir / f"{split}.csv")
            with warnings.catch_warnings():  # MLflow's hints on integer columns, local sources
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(
                    frame, source=str(split_dir / f"{split}.csv"),
                    name=f"{split}-{data_version}", targets="label")
                retry_on_lock(mlflow.log_input)(dataset, context=context)

    def log_model(self, model_path: Path, class_names_path: Path, example: Any) -> str:
        """Log the saved Keras model as this run's pyfunc model; tag and return its URI."""
        from foodtransfer.tracking.models import log_model

        model_uri = log_model(model_path, class_names_path, example)
        self.set_tags({"model_uri": model_uri})
        return model_uri


def mark_published(run_id: str) -> None:
    """Say on the run that its stage's files landed (tag ``outputs=published``)."""
    import mlflow

    retry_on_lock(mlflow.MlflowClient().set_tag)(run_id, OUTPUTS_TAG, PUBLISHED)


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED the runs of this experiment that are still RUNNING although the process
    that started them on this host is gone (SIGKILL, power loss: nothing could end them), and
    mark ``outputs=lost`` the FINISHED runs whose process died before their files landed.
    Returns their ids. Runs of other hosts are left alone: their processes cannot be seen."""
    import mlflow

    client = mlflow.MlflowClient()
    host = f"tags.{HOST_TAG} = '{socket.gethostname()}'"
    runs = retry_on_lock(client.search_runs)(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and {host}",
        max_results=1000)
    unpublished = retry_on_lock(client.search_runs)(
        [experiment_id], filter_string=f"attributes.status = 'FINISHED' and {host} and "
        f"tags.{OUTPUTS_TAG} = '{PENDING}'", max_results=1000)
    ended = []
    for run in [*runs, *unpublished]:
        pid = run.data.tags.get(PID_TAG, "")
        if not (pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))):
            continue
        if run.info.status == "RUNNING":
            retry_on_lock(client.set_terminated)(run.info.run_id, status="KILLED")
            log.info("MLflow run %s (%s) marked killed: its process %s is gone",
                     run.info.run_id, run.info.run_name, pid)
        else:
            retry_on_lock(client.set_tag)(run.info.run_id, OUTPUTS_TAG, LOST)
            retry_on_lock(client.set_tag)(run.info.run_id, NOTE_TAG, (
                f"Its process ({pid}) died after this run ended and before the stage's files "
                "landed: DVC recorded nothing, and the stage ran again. Not compared."))
            log.info("MLflow run %s (%s) marked outputs=lost: its process %s died before "
                     "its files landed", run.info.run_id, run.info.run_name, pid)
        ended.append(run.info.run_id)
    return ended


# System metrics (CPU, memory, disk, network; GPU where nvidia-ml-py finds one) of training
# runs: sampled every SYSTEM_METRICS_INTERVAL seconds and logged at once, in MLflow's "System
# metrics" tab. MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off, and MLflow's
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets another interval.
SYSTEM_METRICS_INTERVAL = 5.0


def _system_metrics_setting() -> bool | None:
    """True, or None where the user set MLflow's own variable (MLflow then reads it)."""
    import mlflow

    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") is not None:
        return None
    if os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") is None:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
    mlflow.set_system_metrics_samples_before_logging(1)
    return True


@contextlib.contextmanager
def tracked_run(experiment: str, name: str, kind: str, params: dict[str, Any],
                tags: dict[str, str], *, system_metrics: bool = False,
                stages: list[str] | None = None) -> Iterator[TrackedRun]:
    """Open the MLflow run ``name`` of ``kind`` ("variant", "pipeline" or "comparison") in
    ``experiment`` with ``params`` and ``tags`` (plus git commit, DVC experiment name, host
    and process), sampling the machine's load while it runs when ``system_metrics``. It ends
    FINISHED, or FAILED on any exception; runs that killed processes left RUNNING are ended
    as KILLED first. ``stages``: the dvc.yaml stages whose code produced the run's numbers
    (tag ``code_version``, see :func:`code_version`)."""
    import mlflow

    end_orphaned_runs(connect(experiment))
    all_tags = {RUN_KIND_TAG: kind, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
                "code_version": code_version(stages), "code_path": code_path()}
    if stages:  # a stage's run: its files land after it ends (mark_published)
        all_tags[OUTPUTS_TAG] = PENDING
    # The commit of the tree the stage runs in: a queued or --temp copy's own checkout (its
    # DVC_ROOT is the workspace, whose HEAD may have moved since).
    commit = git_commit(Path.cwd()) or git_commit(project_root())
    if commit:
        all_tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(WORKER_ENV):  # set by `foodtransfer sweep` on the engine's workers
        all_tags["worker"] = os.environ[WORKER_ENV]
    all_tags.update(tags)
    run = retry_on_lock(mlflow.start_run)(
        run_name=name, tags=all_tags,
        log_system_metrics=_system_metrics_setting() if system_metrics else False)
    status = "FAILED"
    try:
        retry_on_lock(mlflow.log_params)({k: ("null" if v is None else v)
                                          for k, v in params.items()})
        yield TrackedRun(run.info.run_id)
        status = "FINISHED"
    except ServerLostError:
        # The server is gone: it cannot be told; the run stays RUNNING there until the next
        # stage on this host ends it as KILLED (end_orphaned_runs).
        status = "LOST"
        raise
    finally:
        if status == "LOST":
            # One try, failing at once: it forgets the run locally (so nothing retries at exit).
            with _fail_fast_http(tracking_uri()), contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")
        else:
            retry_on_lock(mlflow.end_run)(status=status)
        log.info("MLflow run %s (%s) %s in %s", run.info.run_id, name, status.lower(),
                 tracking_uri())


def get_variant_runs(run_ids: dict[str, str]) -> dict[str, Any]:
    """The finished MLflow runs (``mlflow.entities.Run``) of ``{variant: run_id}``, or a
    TrackingError saying which one is missing or unfinished and how to fix it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    runs = {}
    for variant, run_id in run_ids.items():
        try:
            run = retry_on_lock(client.get_run)(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' (artifacts/{variant}/"
                f"mlflow_run.json) is not in the store {tracking_uri()} ({error.error_code}): "
                "the store was reset or MLFLOW_TRACKING_URI points elsewhere. Re-run the "
                f"variant with 'dvc repro --force {variant}'."
            ) from error
        if run.info.status != "FINISHED":
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' is {run.info.status}, not "
                f"FINISHED: re-run it with 'dvc repro --force {variant}'.")
        if not run.data.tags.get("model_uri"):
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' has no logged model (tag "
                f"model_uri): re-run it with 'dvc repro --force {variant}'.")
        runs[variant] = run
    return runs


def adopt_runs(parent_run_id: str, runs: dict[str, Any]) -> list[str]:
    """Nest the variant runs that no finished pipeline run owns yet under ``parent_run_id``
    (tags ``mlflow.parentRunId`` and ``pipeline_run_id``); returns the adopted variants.

    A variant run that DVC reused from an earlier execution stays under the pipeline run that
    trained it (a run has one parent); the new parent lists it in its tags and report."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    adopted = []
    for variant, run in runs.items():
        owner = run.data.tags.get(PIPELINE_TAG)
        if owner and owner != parent_run_id:
            try:
                if retry_on_lock(client.get_run)(owner).info.status == "FINISHED":
                    continue
            except MlflowException:
                pass  # the owner was deleted: adopt
        retry_on_lock(client.set_tag)(run.info.run_id, PARENT_TAG, parent_run_id)
        retry_on_lock(client.set_tag)(run.info.run_id, PIPELINE_TAG, parent_run_id)
        adopted.append(variant)
    return adopted
