"""Real faults on the real pipeline, in one tiny generated-sample project (module fixtures,
each phase building on the last):

1. ``reference``: an uninterrupted ``dvc repro dropout``.
2. ``interrupted``: the stage scripts of trim, features and dropout (their dvc.yaml commands,
   as subprocesses) get SIGTERM, then SIGKILL, in the middle of their work; then
   ``dvc repro --no-run-cache dropout`` must complete and give the reference's results.
3. The MLflow store unreachable or read-only: a training stage stops before training.
4. ``queued``: two experiments through ``dvc queue start -j 2`` on a fresh SQLite store.
5. ``reseeded``: ``dvc exp run -S data.seed=43``: another split, another data version; and
   ``-S seed=44``: training's seed re-runs training only.

"In the middle" is made certain, not hoped for: the test polls for a sign that the work has
started (the stage's temporary output folder, an epoch in its MLflow run), stops the process
with SIGSTOP, checks that the work is unfinished, then sends the signal and SIGCONT. The
stopped process receives the signal wherever it was, as it would in the wild.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import make_repo, run, stages_run

pytestmark = pytest.mark.slow

EXPERIMENT = "faults"
EPOCHS = 12  # head epochs: long enough that the dropout stage can be stopped mid-training
PARAMS = {
    "image_size": 32, "backbone": "MobileNetV2", "batch_size": 16,  # stand-in weights
    "epochs": EPOCHS, "patience": EPOCHS,
    "data": {"source": "sample", "classes": ["apple_pie", "pizza", "sushi", "tacos"],
             "samples_per_class": 40, "test_per_class": 8,
             "sample": {"train_per_class": 44, "test_per_class": 10, "min_side": 24,
                        "max_side": 56}},
    "baseline": {"epochs": 2, "image_size": 32},
    # The reference recipe: one features file per split, so interrupting its writes is simple.
    "features": {"crop": 1.0, "views": 0, "tta": False},
    "finetune": {"epochs": 1, "unfreeze": 5, "views": 0},
    "mlflow": {"experiment": EXPERIMENT},
}
TIMING_KEYS = {"seconds_per_epoch", "bottom_cache_seconds"}
TERMINATED = "stopped by signal 15; partial outputs removed"


# ----------------------------------------------------------------------------------- helpers

def is_timing(key: str) -> bool:
    """Wall-clock figures and MLflow's system metrics (CPU, memory, disk of the machine), which
    differ between two runs of the same params."""
    return key in TIMING_KEYS or key.startswith("system/")


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not is_timing(k)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_hashes(repo: Path) -> dict[str, str]:
    """Output path -> md5 recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values()
            for out in stage.get("outs", [])}


def drop_from_cache(repo: Path, stages: list[str]) -> None:
    """Remove the stages' outputs from the DVC cache, as if they had never completed with these
    inputs (in the wild, an interrupted stage is one whose new inputs never ran through):
    otherwise `dvc repro` checks the reference run's outputs out instead of running them."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in stages:
        for out in lock["stages"][stage].get("outs", []):
            digest = out["md5"]
            (repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]).unlink(
                missing_ok=True)


def forget_cached_store(repo: Path) -> None:
    """MLflow keeps one SQLAlchemy engine (open SQLite connections) per store URI in this
    process; after the store file was moved away, drop it so that queries open the new one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(
        f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}", None)
    if engine is not None:
        engine.dispose()


def stage_command(repo: Path, stage: str) -> list[str]:
    """The stage's command from dvc.yaml, with this interpreter."""
    command = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def stage_outputs(repo: Path, stage: str) -> list[Path]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for entry in [*spec.get("outs", []), *spec.get("metrics", [])]:
        paths.append(repo / (entry if isinstance(entry, str) else next(iter(entry))))
    return paths


def remove_outputs(repo: Path, stage: str) -> None:
    """What DVC does before it runs a stage."""
    for path in stage_outputs(repo, stage):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def temporaries(repo: Path, stage: str | None = None) -> list[str]:
    """Hidden temporary files and folders of the atomic writers: those of ``stage``'s outputs,
    or all in the project."""
    found = []
    for folder in ("data", "models", "metrics", "plots", "artifacts"):
        root = repo / folder
        if root.is_dir():
            found += [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    if stage is not None:
        names = tuple(f".{out.name}." for out in stage_outputs(repo, stage))
        found = [p for p in found if p.name.startswith(names)]
    return sorted(str(p.relative_to(repo)) for p in found)


def children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    import psutil

    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            pass
    return living


def running_epochs(repo: Path, since_ms: int) -> tuple[str, int] | None:
    """(run id, epochs logged) of a RUNNING 'dropout' run started after ``since_ms``."""
    database = repo / "mlruns" / "mlflow.db"
    if not database.exists():
        return None
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        row = connection.execute(
            "SELECT r.run_uuid, COUNT(m.step) FROM runs r JOIN metrics m "
            "ON m.run_uuid = r.run_uuid AND m.key = 'val_loss' "
            "WHERE r.name = 'dropout' AND r.status = 'RUNNING' AND r.start_time >= ? "
            "GROUP BY r.run_uuid", (since_ms,)).fetchone()
    except sqlite3.OperationalError:  # locked by the writer for a moment, or no tables yet
        return None
    finally:
        connection.close()
    return (row[0], row[1]) if row else None


@dataclass
class Interruption:
    stage: str
    signal: int
    returncode: int
    stderr: str
    seconds: float
    pid: int
    workers: list[int] = field(default_factory=list)  # child processes when it was stopped
    run_id: str | None = None  # the MLflow run it had open
    left: list[str] = field(default_factory=list)  # temporaries right after it ended
    outputs: list[str] = field(default_factory=list)  # the stage's outputs right after it


def interrupt(repo: Path, env: dict[str, str], stage: str, sig: int,
              started: Callable[[subprocess.Popen, int], object],
              unfinished: Callable[[object], bool], *, nice: bool = False,
              attempts: int = 3) -> Interruption:
    """Run the stage's command until ``started`` returns something truthy, stop it, check
    ``unfinished``, deliver ``sig``. An attempt where the work had already finished (a slow
    poll on a busy machine) is thrown away and repeated."""
    for _ in range(attempts):
        remove_outputs(repo, stage)
        log = repo.parent / f"{stage}.{sig}.stderr"
        begin = time.monotonic()
        since_ms = int(time.time() * 1000) - 1000
        with open(log, "w") as stderr:
            command = stage_command(repo, stage)
            if nice:  # trim is quick: keep it from racing ahead of this test's polling
                command = ["nice", "-n", "10", *command]
            process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                                       stderr=stderr)
        sign = None
        while process.poll() is None and time.monotonic() - begin < 300:
            sign = started(process, since_ms)
            if sign:
                break
            time.sleep(0.005 if nice else 0.02)
        if not sign or process.poll() is not None:
            process.kill()
            process.wait()
            continue
        os.kill(process.pid, signal.SIGSTOP)
        workers = children_of(process.pid)
        if not unfinished(sign):
            os.kill(process.pid, signal.SIGKILL)
            os.kill(process.pid, signal.SIGCONT)
            process.wait()
            continue
        os.kill(process.pid, sig)
        os.kill(process.pid, signal.SIGCONT)
        returncode = process.wait(timeout=180)
        run_id = sign[0] if isinstance(sign, tuple) else None
        return Interruption(stage, sig, returncode, log.read_text(), time.monotonic() - begin,
                            process.pid, workers, run_id, temporaries(repo, stage),
                            [str(p.relative_to(repo)) for p in stage_outputs(repo, stage)
                             if p.exists()])
    raise AssertionError(f"could not catch {stage} in the middle of its work in {attempts} tries")


def tmp_npy_started(repo: Path, name: str, min_bytes: int) -> Callable:
    def started(process: subprocess.Popen, since_ms: int) -> str | None:
        for path in glob.glob(str(repo / "data" / f".{name}.*.tmp" / "train.npy")):
            try:
                if os.path.getsize(path) >= min_bytes:
                    return path
            except OSError:
                pass
        return None

    return started


def mlflow_runs(repo: Path) -> tuple:
    """(client, runs of the experiment, oldest first) of the project's store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id],
                                      order_by=["attributes.start_time ASC"])


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tmp_path_factory, standin_weights):
    repo, env = make_repo(tmp_path_factory.mktemp("faults"), PARAMS, standin_weights)
    first = run(["dvc", "repro", "dropout"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "reference run"], repo, env)
    (dropout_run,) = [r for r in mlflow_runs(repo)[1] if r.info.run_name == "dropout"]
    return {
        "repo": repo, "env": env, "output": first.stdout,
        "metrics": read_json(repo / "metrics/dropout.json"),
        "locks": lock_hashes(repo),
        "features": {p.name: md5(p) for p in (repo / "data/features").glob("*.npy")},
        "split": {p.name: (repo / "data/split" / p.name).read_text()
                  for p in (repo / "data/split").glob("*.csv")},
        "data_version": dropout_run.data.tags["data_version"],
        "run": dropout_run,
    }


@pytest.fixture(scope="module")
def interrupted(reference):
    """SIGTERM then SIGKILL in dropout (training), features and trim, newest stage first
    (each needs the outputs of the ones before); then `dvc status` and `dvc repro`."""
    repo, env = reference["repo"], reference["env"]
    results: dict[tuple[str, int], Interruption] = {}

    def mid_training(sign) -> bool:
        return sign[1] < EPOCHS and not (repo / "metrics/dropout.json").exists()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        results["dropout", sig] = interrupt(
            repo, env, "dropout", sig, lambda p, since: running_epochs(repo, since),
            mid_training)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        results["features", sig] = interrupt(
            repo, env, "features", sig, tmp_npy_started(repo, "features", 1),
            lambda sign: not (repo / "data/features").exists())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # The image store's header is 256 bytes: more means images are being decoded.
        results["trim", sig] = interrupt(
            repo, env, "trim", sig, tmp_npy_started(repo, "trimmed", 257),
            lambda sign: not (repo / "data/trimmed").exists(), nice=True)
    status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
    left_before = temporaries(repo)
    drop_from_cache(repo, ["trim", "features", "dropout"])
    recovered = run(["dvc", "repro", "--no-run-cache", "dropout"], repo, env)
    return {**reference, "results": results, "status": status, "left_before": left_before,
            "recovered": recovered}


# ----------------------------------------------------------------------- 4. interruptions

@pytest.mark.parametrize("stage", ["trim", "features", "dropout"])
def test_sigterm_exits_143_and_leaves_nothing(interrupted, stage: str) -> None:
    result = interrupted["results"][stage, signal.SIGTERM]
    assert result.returncode == 143, result.stderr
    assert f"{stage}: {TERMINATED}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.outputs == [], "outputs left after SIGTERM"
    assert result.left == [], "temporary outputs left after SIGTERM"
    if stage == "trim":
        assert result.workers, "trim was stopped before its worker processes started"
        assert alive(result.workers) == []


def test_sigterm_in_training_ends_the_mlflow_run_failed(interrupted) -> None:
    result = interrupted["results"]["dropout", signal.SIGTERM]
    client, runs = mlflow_runs(interrupted["repo"])
    (run_,) = [r for r in runs if r.info.run_id == result.run_id]
    assert run_.info.status == "FAILED" and run_.info.end_time
    epochs = client.get_metric_history(run_.info.run_id, "val_loss")
    assert 1 <= len(epochs) < EPOCHS  # stopped mid-training ...
    assert "test_accuracy" not in run_.data.metrics  # ... before evaluation
    assert f"MLflow run {result.run_id} (dropout) failed" in result.stderr


@pytest.mark.parametrize("stage", ["trim", "features", "dropout"])
def test_sigkill_leaves_nothing_dvc_takes_as_complete(interrupted, stage: str) -> None:
    result = interrupted["results"][stage, signal.SIGKILL]
    assert result.returncode == -signal.SIGKILL
    # Outputs are renamed into place only when complete: none exists after the kill, and
    # DVC sees the stage as not done ...
    assert result.outputs == []
    status = interrupted["status"][stage]
    changed = {path: what for entry in status for path, what in
               entry.get("changed outs", {}).items()}
    outputs = [str(p.relative_to(interrupted["repo"])) for p in
               stage_outputs(interrupted["repo"], stage)]
    assert changed == {path: "deleted" for path in outputs}, status
    # ... at most a hidden temporary folder, named after the dead process, which is no
    # output of any stage, and which the next run of the stage removes.
    for name in result.left:
        assert Path(name).name.startswith(".") and f".pid{result.pid}." in name, name
    if stage == "trim":
        assert result.workers and alive(result.workers) == [], "orphaned decode workers"
    if stage == "dropout":
        # SIGKILL cannot be caught: its MLflow run never finished and has no test metrics
        # (the next run on this host marks it KILLED: see the recovery test).
        _, runs = mlflow_runs(interrupted["repo"])
        (run_,) = [r for r in runs if r.info.run_id == result.run_id]
        assert run_.info.status != "FINISHED"
        assert "test_accuracy" not in run_.data.metrics


def test_sigkill_leftovers_are_ignored_by_dvc_and_removed_by_the_next_run(interrupted) -> None:
    left = interrupted["left_before"]
    killed = interrupted["results"]
    assert set(killed["trim", signal.SIGKILL].left) <= set(left)
    assert any(".trimmed." in name for name in left), left  # trim was killed mid-write
    assert json.dumps(interrupted["status"]).count(".tmp") == 0  # DVC did not see them
    assert temporaries(interrupted["repo"]) == []  # the recovering run removed them


def test_repro_after_interruptions_gives_the_uninterrupted_results(interrupted) -> None:
    repo = interrupted["repo"]
    ran = stages_run(interrupted["recovered"].stdout)
    assert ran == {"trim", "features", "dropout"}  # split: same trimmed data, nothing to do
    # 6. Same params twice (the reference and this run) -> identical data and metrics.
    locks = lock_hashes(repo)
    for path in ("data/raw", "data/trimmed", "data/split"):
        assert locks[path] == interrupted["locks"][path], path
    assert {p.name: md5(p) for p in (repo / "data/features").glob("*.npy")} == \
        interrupted["features"]
    metrics = read_json(repo / "metrics/dropout.json")
    assert without_timing(metrics) == without_timing(interrupted["metrics"])
    assert metrics["epochs_run"] == EPOCHS
    _, runs = mlflow_runs(repo)
    latest = [r for r in runs if r.info.run_name == "dropout"][-1]
    assert latest.info.status == "FINISHED"
    assert without_timing(latest.data.metrics) == without_timing(interrupted["run"].data.metrics)
    assert latest.data.tags["data_version"] == interrupted["data_version"]
    # The run a SIGKILL left RUNNING (nothing could end it) was ended as KILLED by the next
    # stage that opened a run on this host, seeing its process gone.
    killed = interrupted["results"]["dropout", signal.SIGKILL]
    (run_,) = [r for r in runs if r.info.run_id == killed.run_id]
    assert run_.info.status == "KILLED"
    assert run_.data.tags["pid"] == str(killed.pid)


# ----------------------------------------------------------------------------- 5. tracking

def run_stage_script(repo: Path, env: dict[str, str], stage: str,
                     prefix: list[str] | None = None) -> tuple[subprocess.CompletedProcess,
                                                               float]:
    started = time.monotonic()
    result = subprocess.run([*(prefix or []), *stage_command(repo, stage)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, time.monotonic() - started


def assert_stopped_before_training(repo: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    for path in stage_outputs(repo, "transfer"):
        assert not path.exists(), path  # no history.csv: not one epoch was recorded


def test_unreachable_tracking_server_stops_the_stage_before_training(interrupted) -> None:
    repo = interrupted["repo"]
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**interrupted["env"], "MLFLOW_TRACKING_URI": uri}
    result, seconds = run_stage_script(repo, env, "transfer")
    assert_stopped_before_training(repo, result)
    assert f"transfer: error: Cannot use the MLflow tracking store {uri}" in result.stderr
    assert "Connection refused" in result.stderr
    # The stage's start (TensorFlow, the features) plus one refused connection; with
    # MLflow's default retries the same failure takes minutes.
    assert seconds < 90, seconds


def read_only_wrapper(store: Path) -> tuple[list[str], str]:
    """A command prefix that runs a command with ``store`` read-only for real, and how.

    chmod does not stop root (which CI and these machines run as): prefer a read-only bind
    mount in a private mount namespace (EROFS for everyone, root included); as another user,
    chmod; as root without namespaces, make the store a regular file (unwritable as a store).
    """
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
              'exec "$@"')
    for unshare in (["unshare", "--mount", "--propagation", "private"],
                    ["unshare", "--mount", "--map-root-user", "--propagation", "private"]):
        probe = subprocess.run([*unshare, "sh", "-c", script, "sh", str(store), "sh", "-c",
                                f'! touch "{store}/.probe" 2>/dev/null'],
                               capture_output=True, text=True)
        if probe.returncode == 0 and not (store / ".probe").exists():
            return [*unshare, "sh", "-c", script, "sh", str(store)], "read-only bind mount"
    if os.geteuid() != 0:
        store.chmod(0o555)
        return [], "chmod a-w"
    shutil.move(store, store.with_name("mlruns.moved"))
    store.write_text("a file where the store folder should be\n")
    return [], "mlruns is a regular file"


def test_read_only_store_stops_the_stage_before_training(interrupted) -> None:
    repo, env = interrupted["repo"], interrupted["env"]
    store = repo / "mlruns"
    database = md5(store / "mlflow.db")
    prefix, how = read_only_wrapper(store)
    try:
        result, seconds = run_stage_script(repo, env, "transfer", prefix)
    finally:
        if how == "chmod a-w":
            store.chmod(0o755)
        elif how == "mlruns is a regular file":
            store.unlink()
            shutil.move(store.with_name("mlruns.moved"), store)
    assert_stopped_before_training(repo, result)
    assert f"transfer: error: The MLflow store {store} is not writable" in result.stderr, how
    assert "MLFLOW_TRACKING_URI" in result.stderr
    assert seconds < 90, seconds
    assert md5(store / "mlflow.db") == database  # the store is as it was


# -------------------------------------------------------------------------- 5. concurrency

QUEUED = {"q-drop02": "0.2", "q-drop04": "0.4"}


@pytest.fixture(scope="module")
def queued(interrupted):
    """Two experiments queued and run by two DVC queue workers at once, on a store that does
    not exist yet (moved away): both stages race to create the SQLite schema and experiment,
    then log epochs, artifacts and models side by side."""
    repo, env = interrupted["repo"], interrupted["env"]
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "recovered run"], repo, env)
    shutil.move(repo / "mlruns", repo.parent / "mlruns.before-queue")
    forget_cached_store(repo)
    for name, dropout in QUEUED.items():
        run(["dvc", "exp", "run", "--queue", "-S", f"dropout={dropout}", "-n", name,
             "finetune"], repo, env)
    # The workers are forked from `dvc queue start` and keep its stdout and stderr until they
    # exit: captured pipes would hold this call until the queue is drained. Their logs are read
    # with `dvc queue logs` below.
    started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0
    statuses: dict[str, str] = {}
    # Bounded by progress, not by a wall clock that a busy machine exceeds: the queue may take
    # as long as it needs while its states change or its runs log to the MLflow store, and
    # fails after 300 s without either (or 45 min in all).
    idle_limit, hard_deadline = 300, time.monotonic() + 2700
    last_change, last_seen = time.monotonic(), None
    try:
        while time.monotonic() < hard_deadline:
            table = run(["dvc", "queue", "status"], repo, env).stdout
            statuses = {line.split()[1]: line.split()[-1] for line in table.splitlines()
                        if len(line.split()) >= 4 and line.split()[1] in QUEUED}
            if len(statuses) == len(QUEUED) and all(
                    s in ("Success", "Failed") for s in statuses.values()):
                break
            store = repo / "mlruns" / "mlflow.db"
            seen = (tuple(sorted(statuses.items())),
                    store.stat().st_size if store.exists() else 0,
                    sum(1 for _ in (repo / "mlruns").rglob("*")) if store.exists() else 0)
            if seen != last_seen:
                last_seen, last_change = seen, time.monotonic()
            elif time.monotonic() - last_change > idle_limit:
                raise AssertionError(f"the queue made no progress for {idle_limit} s: "
                                     f"{statuses}")
            time.sleep(5)
    finally:
        for name, state in statuses.items():
            if state not in ("Success", "Failed"):
                subprocess.run(["dvc", "queue", "kill", name], cwd=repo, env=env,
                               capture_output=True)
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True)
    logs = {name: subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env,
                                 capture_output=True, text=True).stdout for name in QUEUED}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    return {**interrupted, "statuses": statuses, "logs": logs, "shown": shown}


def test_two_queued_experiments_both_succeed(queued) -> None:
    assert queued["statuses"] == {name: "Success" for name in QUEUED}, queued["logs"]
    shown = json.dumps(queued["shown"])
    assert all(f'"name": "{name}"' in shown for name in QUEUED)
    for name, log in queued["logs"].items():
        assert "Running stage 'dropout'" in log and "Running stage 'finetune'" in log, log
        for bad in ("database is locked", "already exists", "Traceback", "error:"):
            assert bad not in log, (name, bad, log)


def test_queued_experiments_land_as_distinct_mlflow_runs(queued) -> None:
    client, runs = mlflow_runs(queued["repo"])
    assert {r.data.tags.get("dvc_exp_name") for r in runs} == set(QUEUED)  # the new store
    assert len({r.info.run_id for r in runs}) == len(runs) == 2 * len(QUEUED)
    for name, dropout in QUEUED.items():
        mine = [r for r in runs if r.data.tags.get("dvc_exp_name") == name]
        assert sorted(r.info.run_name for r in mine) == ["dropout", "finetune"], name
        for run_ in mine:
            assert run_.info.status == "FINISHED"
            assert run_.data.params["dropout"] == dropout
            assert "test_accuracy" in run_.data.metrics
            # Same seed, same data: the data version of the reference run.
            assert run_.data.tags["data_version"] == queued["data_version"]
        (dropout_run,) = [r for r in mine if r.info.run_name == "dropout"]
        history = client.get_metric_history(dropout_run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))  # every epoch logged


# ---------------------------------------------------------------------------- 6. seeds

@pytest.fixture(scope="module")
def reseeded(queued):
    repo, env = queued["repo"], queued["env"]
    result = run(["dvc", "exp", "run", "-S", "data.seed=43", "-n", "seed43", "dropout"], repo,
                 env)
    training_seed = run(["dvc", "exp", "run", "--temp", "-S", "seed=44", "-n", "seed44",
                         "dropout"], repo, env)
    return {**queued, "result": result, "training_seed": training_seed}


def test_the_training_seed_reruns_only_training(reseeded) -> None:
    assert stages_run(reseeded["training_seed"].stdout) == {"dropout"}


def test_a_temp_experiment_runs_the_code_of_its_copy(reseeded) -> None:
    """`dvc exp run --temp` runs the stage in a copy of the tree: the code it runs is the
    copy's (env's PYTHONPATH names the workspace's src/, as an editable install does)."""
    from foodtransfer.dag import code_version

    (run_,) = [r for r in mlflow_runs(reseeded["repo"])[1]
               if r.data.tags.get("dvc_exp_name") == "seed44"]
    assert "/.dvc/tmp/exps/" in run_.data.tags["code_path"], run_.data.tags["code_path"]
    assert run_.data.tags["code_version"] == code_version(reseeded["repo"], ["dropout"])


def test_another_seed_gives_another_split_and_data_version(reseeded) -> None:
    repo = reseeded["repo"]
    assert {"download", "trim", "split", "features", "dropout"} <= \
        stages_run(reseeded["result"].stdout)
    split = {p.name: p.read_text() for p in (repo / "data/split").glob("*.csv")}
    assert split.keys() == reseeded["split"].keys()
    for name in split:
        assert split[name] != reseeded["split"][name], name
    from foodtransfer.data.manifests import data_version

    (run_,) = [r for r in mlflow_runs(repo)[1]
               if r.data.tags.get("dvc_exp_name") == "seed43"]
    assert run_.data.params["data.seed"] == "43" and run_.data.params["seed"] == "42"
    assert run_.data.tags["data_version"] == data_version(repo / "data/split")
    assert run_.data.tags["data_version"] != reseeded["data_version"]
