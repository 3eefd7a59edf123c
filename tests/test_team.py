"""Team scale for real, on loopback: a real `mlflow server --app-name basic-auth` (SQLite
backend, proxied artifacts, MLflow's users and permissions) that the tiny pipeline logs to, a
local-directory DVC remote with a bare git remote between three clones, and the server stopped
in the middle of a stage.

Two users besides the admin: `trainer` (trains, registers candidates: READ by default, MANAGE
on what it creates) and `promoter` (EDIT on the production model, which the admin created).
A (the trainer): runs the pipeline against the server, which registers a candidate and moves
no @champion; the trainer's `promote` is refused, the promoter's succeeds and predict follows
it. A pushes (git and DVC), runs and pushes an experiment.
B: clones, `dvc pull`s the same outputs (nothing to re-run), pulls the experiment.
C: clones and runs `dvc exp run --pull`: upstream outputs come from the remote, not recomputed;
   its report looks up the reused variants' runs (their ids in pulled artifacts) on the server.
Then `foodtransfer sweep` from A on a real Dask cluster: a scheduler and two worker processes
(two "machines"): a 2 x 2 grid lands as four DVC experiments and four pipeline runs, compare
aggregates them, though one worker is killed (with everything it started) in the middle of a
task; an unreachable scheduler is one clear line, exit code 2, nothing half-done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import free_port, start_server, stop_process_group
from test_pipeline_e2e import TINY, VARIANTS, make_repo, run, stages_run

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


ADMIN = ("admin", "admin-password-for-tests")
TRAINER = ("trainer", "trainer-password-1")
PROMOTER = ("promoter", "promoter-password-1")
PRODUCTION = "food101-classifier"


def login(user: tuple[str, str]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


class TrackingServer:
    """`mlflow server --app-name basic-auth` on a loopback port (users in its own SQLite
    database, READ for everyone by default), restartable on the same port and stores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        (root / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\n"
            f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        self.command = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                        "--serve-artifacts", "--artifacts-destination",
                        (root / "artifacts").as_uri(),
                        "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-secret-for-the-tests",
                    # No GenAI job runner (its queue consumers): two cores for the tests.
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            self.env.pop(name, None)

        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = start_server(self.command, f"{self.url}/health",
                                    self.root / "server.log", cwd=self.root, env=self.env)

    def set_up_users(self, experiment: str) -> None:
        """What docs/scale.md has an admin do on a new server: the users; the experiment and
        the candidates model, EDIT on them for the trainer; the production model and the
        experiment of its files, EDIT on them for the promoter only."""
        from mlflow import MlflowClient
        from mlflow.server import get_app_client

        with _as(ADMIN):
            admin = get_app_client("basic-auth", tracking_uri=self.url)
            admin.create_user(*TRAINER)
            admin.create_user(*PROMOTER)
            client = MlflowClient(self.url)
            experiment_id = client.create_experiment(experiment)
            client.create_registered_model(f"{PRODUCTION}-candidates")
            client.create_registered_model(PRODUCTION)
            production_files = client.create_experiment(f"{PRODUCTION}-production")
            admin.grant_user_permission(TRAINER[0], "experiment", experiment_id, "EDIT")
            admin.grant_user_permission(TRAINER[0], "registered_model",
                                        f"{PRODUCTION}-candidates", "EDIT")
            admin.grant_user_permission(PROMOTER[0], "registered_model", PRODUCTION, "EDIT")
            admin.grant_user_permission(PROMOTER[0], "experiment", production_files, "EDIT")
        self.cheapen_password_checks()

    def cheapen_password_checks(self) -> None:
        """MLflow checks the password on every request against werkzeug's scrypt hash, about
        0.1 s of a core each (docs/scale.md): on two cores the pipeline's requests would cost
        many minutes. The same passwords hashed with PBKDF2 at 1000 rounds (werkzeug checks
        either format) are checked in under a millisecond; what is checked is unchanged."""
        import sqlite3

        from werkzeug.security import generate_password_hash

        with contextlib.closing(sqlite3.connect(self.root / "auth.db")) as database:
            for name, password in (ADMIN, TRAINER, PROMOTER):
                changed = database.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ?",
                    (generate_password_hash(password, "pbkdf2:sha256:1000"), name)).rowcount
                assert changed == 1, name
            database.commit()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


@contextlib.contextmanager
def _as(user: tuple[str, str]) -> Iterator[None]:
    """This test process's MLflow calls log in as ``user`` for the block."""
    saved = {name: os.environ.get(name) for name in login(user)}
    os.environ.update(login(user))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_for(server: TrackingServer):
    """A client of the server; the module's tests read as the trainer (see ``team``)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def git(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], repo, env)


def checksums(repo: Path) -> dict[str, str]:
    """md5 of every file of the pipeline's outputs (what DVC tracks and the metrics files)."""
    sums = {}
    for folder in ("data/split", "data/features", "metrics", "plots"):
        for path in sorted((repo / folder).rglob("*")):
            if path.is_file():
                sums[str(path.relative_to(repo))] = hashlib.md5(path.read_bytes()).hexdigest()
    return sums


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, standin_weights: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("team")
    server = TrackingServer(root / "server")
    server.start()
    reader = contextlib.ExitStack()
    try:
        server.set_up_users(TINY["mlflow"]["experiment"])
        reader.enter_context(_as(TRAINER))  # this process's own MLflow calls: the trainer
        (root / "a").mkdir()
        a, env = make_repo(root / "a", TINY, standin_weights)
        # SQLite behind the server has one writer: sample system metrics every 5 s, not 1 s.
        env = {**env, "MLFLOW_TRACKING_URI": server.url,
               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "5", **login(TRAINER)}
        remote, origin = root / "dvc-remote", root / "origin.git"
        run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root, env)
        git(a, env, "remote", "add", "origin", str(origin))
        run(["dvc", "remote", "add", "-d", "storage", str(remote)], a, env)
        first = run(["dvc", "repro"], a, env)
        # On the team server the pipeline promotes nothing: the trainer may not, the
        # promoter may.
        script = str(BIN / "foodtransfer")
        trainer_promote = subprocess.run([script, "promote", "1"], cwd=a, env=env,
                                         capture_output=True, text=True, timeout=300)
        champion_after_refusal = _champion(server)
        promoted = run([script, "promote", "1"], a, {**env, **login(PROMOTER)})
        run(["dvc", "push"], a, env)
        git(a, env, "add", "-A")
        git(a, env, "commit", "-qm", "pipeline run, remote")
        git(a, env, "push", "-q", "origin", "main")
        pushed = checksums(a)
        experiment = run(["dvc", "exp", "run", "-S", "dropout=0.3", "-n", "drop03"], a, env)
        # With a champion in place, the trainer still cannot move it to their new candidate.
        second_refusal = subprocess.run([script, "promote", "2"], cwd=a, env=env,
                                        capture_output=True, text=True, timeout=300)
        champion_after_second_refusal = _champion(server)
        run(["dvc", "exp", "push", "origin", "drop03"], a, env)
        drop03_metrics = json.loads((a / "metrics" / "dropout.json").read_text())
        git(a, env, "checkout", "--", ".")  # back to the pushed commit
        run(["dvc", "checkout", "-f"], a, env)

        b = root / "b"
        run(["git", "clone", "-q", str(origin), str(b)], root, env)
        pull = run(["dvc", "pull"], b, env)
        repro_b = run(["dvc", "repro"], b, env)
        run(["dvc", "exp", "pull", "origin", "drop03"], b, env)
        shown = run(["dvc", "exp", "show", "--json"], b, env)

        c = root / "c"
        run(["git", "clone", "-q", str(origin), str(c)], root, env)
        pulled_run = run(["dvc", "exp", "run", "--pull", "-S", "dropout=0.45", "-n", "drop045"],
                         c, env)
        yield {"server": server, "root": root, "a": a, "b": b, "c": c, "env": env,
               "first": first, "experiment": experiment, "pull": pull, "repro_b": repro_b,
               "shown": shown, "pulled_run": pulled_run, "drop03_metrics": drop03_metrics,
               "pushed": pushed, "trainer_promote": trainer_promote,
               "champion_after_refusal": champion_after_refusal, "promoted": promoted,
               "second_refusal": second_refusal,
               "champion_after_second_refusal": champion_after_second_refusal}
    finally:
        reader.close()
        server.stop()


def _champion(server: TrackingServer) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client_for(server).get_model_version_by_alias(PRODUCTION,
                                                                 "champion").version)
    except MlflowException:
        return None


# ------------------------------------------------------------------- the tracking server
def test_only_a_promoter_moves_the_champion(team, tmp_path: Path) -> None:
    """The trainer's pipeline registered a candidate and moved no @champion; the trainer's
    promote was refused in one line and moved nothing; the promoter's made the champion."""
    assert "food101-classifier-candidates v1 @challenger;" in team["first"].stdout, \
        team["first"].stdout
    for refused in (team["trainer_promote"], team["second_refusal"]):
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert ("foodtransfer promote: error: the tracking server http://127.0.0.1:"
                in refused.stderr)
        assert ("denied MLFLOW_TRACKING_USERNAME='trainer' promotion (a new version of "
                "'food101-classifier' and its @champion); @champion did not move (403 "
                "permission denied)") in refused.stderr, refused.stderr
    assert team["champion_after_refusal"] is None
    assert team["champion_after_second_refusal"] == "1"  # still the promoter's
    assert ("@champion of food101-classifier -> v1, a copy of food101-classifier-candidates v1"
            in team["promoted"].stdout), team["promoted"].stdout
    client = client_for(team["server"])
    assert len(client.search_model_versions(f"name = '{PRODUCTION}'")) == 1  # none refused
    champion = client.get_model_version_by_alias(PRODUCTION, "champion")
    assert champion.tags["candidate_version"] == "1"
    # Its files are the production experiment's, which the trainer can only read.
    production_files = client.get_experiment_by_name(f"{PRODUCTION}-production")
    assert client.get_run(champion.run_id).info.experiment_id == \
        production_files.experiment_id
    # The trainer cannot move the alias by hand either, nor overwrite the champion's files:
    # the server says so.
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        client.set_registered_model_alias(PRODUCTION, "champion", "1")
    planted = tmp_path / "planted" / "python_model.pkl"
    planted.parent.mkdir()
    planted.write_bytes(b"not the champion")
    with pytest.raises(Exception, match="403|PERMISSION_DENIED|Permission denied"):
        client.log_artifact(champion.run_id, str(planted), "model")
    with pytest.raises(Exception, match="403|PERMISSION_DENIED|Permission denied"):
        client.log_model_artifacts(champion.source[len("models:/"):], str(planted.parent))
    import mlflow

    mlflow.set_tracking_uri(team["server"].url)
    try:
        kept = Path(mlflow.artifacts.download_artifacts(f"models:/{PRODUCTION}@champion",
                                                        dst_path=str(tmp_path / "back")))
    finally:
        mlflow.set_tracking_uri(None)
    assert (kept / "python_model.pkl").read_bytes() != b"not the champion"
    # The production model was rebuilt by the promoter's promote (its pyfunc made there around
    # the candidate's Keras file), not copied: its MLmodel names the production run.
    import yaml

    assert yaml.safe_load((kept / "MLmodel").read_text())["run_id"] == champion.run_id


def test_a_missing_or_refused_login_fails_every_command_fast_in_one_line(team) -> None:
    from foodtransfer.dag import load_stages

    a = team["a"]
    anonymous = {k: v for k, v in team["env"].items()
                 if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    wrong = {**team["env"], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    lock_before = (a / "dvc.lock").read_bytes()
    script = str(BIN / "foodtransfer")
    # Each stage's command as DVC runs it (straight, so that DVC does not remove the
    # outputs of a stage it was forced to re-run).
    python = str(BIN / "python")
    commands = {f"stage {name}": ["bash", "-c", stage["cmd"].replace("python ", f"{python} ", 1)]
                for name, stage in load_stages(a).items()}
    commands.update({"predict": [script, "predict", str(a / "dvc.yaml")],
                     "promote": [script, "promote", "1"], "compare": [script, "compare"],
                     "serve": [script, "serve", "--port", str(free_port())],
                     "sweep": [script, "sweep", "-S", "dropout=0.3,0.4"]})
    no_login = ("asks for a login and none is set: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD")
    refused = "refused the login of MLFLOW_TRACKING_USERNAME='trainer' (401"
    for what, command in commands.items():
        # Every stage shares one check (stages/runner.py): a wrong password for one of them.
        cases = [(anonymous, no_login)]
        if not what.startswith("stage ") or what == "stage baseline":
            cases.append((wrong, refused))
        for env, expected in cases:
            started = time.monotonic()
            result = subprocess.run(command, cwd=a, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode != 0, (what, result.stdout, result.stderr)
            assert time.monotonic() - started < 60, what
            errors = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(errors) == 1 and ": error: " in errors[0], (what, result.stderr)
            assert expected in errors[0], (what, result.stderr)
            assert "Traceback" not in result.stderr, (what, result.stderr)
            assert result.returncode == 2, (what, result.returncode)
    # Logged in, allowed to read the experiment but not to write it (the promoter): the
    # stages that log stop before any training, in one line (403).
    promoter = {**team["env"], **login(PROMOTER)}
    for what in ("stage transfer", "stage report"):
        result = subprocess.run(commands[what], cwd=a, env=promoter, capture_output=True,
                                text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(errors) == 1, (what, result.stderr)
        assert "denied MLFLOW_TRACKING_USERNAME='promoter' writing to the experiment 'e2e' " \
               "(403 permission denied)" in errors[0], (what, result.stderr)
    assert (a / "dvc.lock").read_bytes() == lock_before
    assert _champion(team["server"]) == "1"


def test_runs_params_metrics_and_nesting_live_on_the_server(team) -> None:
    client = client_for(team["server"])
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
    parents = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    first = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert sorted(run_.info.run_name for run_ in children) == sorted(VARIANTS)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["data.samples_per_class"] == "30"
        assert child.data.params["backbone"] == "MobileNetV2"
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [metric.step for metric in history] == sorted(m.step for m in history) and history
        assert {"test_accuracy", "test_accuracy_ci_low"} <= set(child.data.metrics)
    # The run ids the pulled artifacts name are the server's runs.
    for variant in VARIANTS:
        run_id = json.loads((team["b"] / f"artifacts/{variant}/mlflow_run.json")
                            .read_text())["run_id"]
        assert client.get_run(run_id).data.tags["variant"] == variant


def test_artifacts_and_models_come_back_through_the_server(team, tmp_path: Path) -> None:
    import mlflow

    client = client_for(team["server"])
    run_id = json.loads((team["a"] / "artifacts/dropout/mlflow_run.json").read_text())["run_id"]
    local = Path(client.download_artifacts(run_id, "learning_curves.png", str(tmp_path)))
    assert local.read_bytes() == (team["a"] / "artifacts/dropout/learning_curves.png") \
        .read_bytes()
    # Artifacts were stored by the server, not by the training machine.
    assert list((team["root"] / "server" / "artifacts").rglob("learning_curves.png"))
    mlflow.set_tracking_uri(team["server"].url)
    try:
        model = mlflow.pyfunc.load_model("models:/food101-classifier@champion")
        from foodtransfer.data.images import ImageStore

        images = ImageStore(team["a"] / "data/trimmed/test.npy").read([0, 1])
        probabilities = model.predict(images)
        assert list(probabilities.columns) == TINY["data"]["classes"]
        np.testing.assert_allclose(probabilities.to_numpy().sum(axis=1), 1, atol=1e-4)
    finally:
        mlflow.set_tracking_uri(None)
    version = client.get_model_version_by_alias("food101-classifier", "champion")
    assert version.tags["variant"] in VARIANTS


def test_predict_and_compare_work_against_the_server(team) -> None:
    from PIL import Image

    a, env = team["a"], team["env"]
    photo = team["root"] / "photo.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 50, 3), np.uint8)).save(photo)
    predicted = run([str(BIN / "foodtransfer"), "predict", str(photo), "--json"], a, env)
    output = json.loads(predicted.stdout)
    assert output["model_uri"] == "models:/food101-classifier@champion"
    assert len(output["images"][0]["predictions"]) == 4
    compared = run([str(BIN / "foodtransfer"), "compare", "--out", str(team["root"] / "cmp")],
                   a, env)
    assert "compared" in compared.stdout and "pipeline runs" in compared.stdout
    assert (team["root"] / "cmp" / "experiments.md").is_file()
    client = client_for(team["server"])
    experiment = client.get_experiment_by_name("e2e")
    assert client.search_runs([experiment.experiment_id], "tags.run_kind = 'comparison'")


# --------------------------------------------------------------------------- the DVC remote
def test_a_clone_pulls_the_same_outputs_and_reruns_nothing(team) -> None:
    assert checksums(team["b"]) == team["pushed"]
    assert stages_run(team["repro_b"].stdout) == set()
    assert "didn't change, skipping" in team["repro_b"].stdout


def test_an_experiment_moves_between_clones(team) -> None:
    assert "drop03" in team["shown"].stdout
    b, env = team["b"], team["env"]
    run(["dvc", "exp", "apply", "drop03"], b, env)
    applied = json.loads((b / "metrics" / "dropout.json").read_text())
    assert applied["test_accuracy"] == team["drop03_metrics"]["test_accuracy"]
    assert applied["best_val_accuracy"] == team["drop03_metrics"]["best_val_accuracy"]


def test_exp_run_pull_fetches_upstream_outputs_instead_of_recomputing(team) -> None:
    ran = stages_run(team["pulled_run"].stdout)
    assert ran == {"dropout", "finetune", "report"}, ran  # not download .. features
    c = team["c"]
    assert (c / "data" / "features" / "train.npy").is_file()
    # The report found the reused variants' runs (ids from pulled artifacts) on the server.
    text = (c / "reports" / "comparison.md").read_text()
    baseline_run = json.loads((c / "artifacts/baseline/mlflow_run.json").read_text())["run_id"]
    assert f"`{baseline_run}` (reused from pipeline run" in text


# --------------------------------------------------------- foodtransfer sweep on a Dask cluster
# On A's project: its pipeline ran and was pushed, so the sweep's shared stages are in dvc.lock.
GRID = ["-S", "dropout=0.3,0.6", "-S", "l2=0.0001,0.001"]  # each experiment: the head onwards


class DaskCluster:
    """`dask scheduler` and named `dask worker` processes (no nanny: a killed worker stays
    dead, as a machine that died), each in its own session, stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, workers: list[str]) -> None:
        http = free_port()
        self.processes["scheduler"] = start_server(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--dashboard-address", f"127.0.0.1:{http}", "--no-show"],
            f"http://127.0.0.1:{http}/health", self.folder / "scheduler.log", env=self.env,
            cwd=self.folder)
        for name in workers:
            http = free_port()
            self.processes[name] = start_server(
                [str(BIN / "dask"), "worker", self.address, "--name", name, "--nthreads", "1",
                 "--no-nanny", "--host", "127.0.0.1", "--dashboard-address",
                 f"127.0.0.1:{http}"],
                f"http://127.0.0.1:{http}/health", self.folder / f"{name}.log", env=self.env,
                cwd=self.folder)

    def kill(self, name: str) -> None:
        """SIGKILL the worker and every process it started: the machine is gone."""
        process = psutil.Process(self.processes[name].pid)
        family = [process, *process.children(recursive=True)]
        for member in family:
            member.kill()
        psutil.wait_procs(family, timeout=30)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process_group(process)


def processing(address: str) -> dict[str, list[str]]:
    """What each worker (by name) is executing now."""
    from distributed import Client

    from foodtransfer.sweep import executing

    with Client(address, timeout="10s") as client:
        return executing(client)


@pytest.fixture(scope="module")
def dask_cluster(team) -> Iterator[DaskCluster]:
    """Two "machines" for `foodtransfer sweep`: a scheduler and the workers w1 and w2."""
    cluster = DaskCluster(team["root"], team["env"])
    try:
        cluster.start(["w1", "w2"])
        yield cluster
    finally:
        cluster.stop()


def test_an_unreachable_scheduler_is_one_line_and_leaves_nothing(team) -> None:
    repo, env, origin = team["a"], team["env"], team["root"] / "origin.git"
    lock_before = (repo / "dvc.lock").read_bytes() if (repo / "dvc.lock").exists() else None
    refs_before = run(["git", "ls-remote", str(origin)], repo, env).stdout
    started = time.monotonic()
    result = subprocess.run([str(BIN / "foodtransfer"), "sweep", *GRID, "--scheduler",
                             f"tcp://127.0.0.1:{free_port()}"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "foodtransfer sweep: error: cannot reach the Dask scheduler at tcp://127.0.0.1:" \
        in result.stderr and "leave out --scheduler" in result.stderr
    assert time.monotonic() - started < 60
    assert run(["git", "ls-remote", str(origin)], repo, env).stdout == refs_before
    assert ((repo / "dvc.lock").read_bytes() if (repo / "dvc.lock").exists() else None) \
        == lock_before
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env).stdout == ""


def test_a_failed_experiment_reports_its_last_lines(team, dask_cluster) -> None:
    repo, env = team["a"], team["env"]
    result = subprocess.run([str(BIN / "foodtransfer"), "sweep", "-S", "dropout=7",
                             "--scheduler", dask_cluster.address], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, (result.stdout, result.stderr)
    failed = re.search(r"sweep: FAILED (sweep-\w+-1) \(dropout=7\): .* dvc exp run failed "
                       r"with exit code \d+:\n", result.stdout)
    assert failed, result.stdout
    assert "dropout = 7" in result.stdout.split(failed.group(0), 1)[1], result.stdout
    assert "compare:" not in result.stdout
    assert f"1 of 1 experiments failed: {failed.group(1)}" in result.stderr
    refs = run(["git", "ls-remote", str(team["root"] / "origin.git"), "refs/exps/*"], repo,
               env).stdout
    assert failed.group(1) not in refs  # a failed experiment is not pushed


def test_a_grid_lands_once_each_though_a_worker_dies_mid_task(team, dask_cluster) -> None:
    repo, env, dask = team["a"], team["env"], dask_cluster
    with tempfile.TemporaryFile("w+") as log:
        driver = subprocess.Popen(
            [str(BIN / "foodtransfer"), "sweep", *GRID, "--scheduler", dask.address],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            # Wait until w2 has finished one experiment and is 15 s into the next: kill it.
            deadline = time.monotonic() + 1500
            first = second = None
            while time.monotonic() < deadline and driver.poll() is None:
                running = processing(dask.address).get("w2", [])
                if running and first is None:
                    first = running[0]
                elif running and running[0] != first and second is None:
                    second, seen_at = running[0], time.monotonic()
                if second is not None and time.monotonic() - seen_at > 15:
                    if processing(dask.address).get("w2") == [second]:
                        dask.kill("w2")
                        break
                time.sleep(1)
            assert second is not None, "w2 never took a second experiment"
            driver.wait(timeout=1500)
        finally:
            if driver.poll() is None:
                stop_process_group(driver)
            log.seek(0)
            output = log.read()
    assert driver.returncode == 0, output
    names = sorted(set(re.findall(r"sweep: done (sweep-\w+-\d)", output)))
    assert len(names) == 4, output
    # The experiment w2 died in was done again, on w1, and only once.
    assert re.search(rf"sweep: done {second} \(.*\) on worker w1 ", output), (second, output)
    assert all(output.count(f"sweep: done {name} ") == 1 for name in names), output
    # What no swept param reaches was computed once by the driver, never by a task.
    assert "sweep: computing download, trim, split, features, baseline, transfer once" \
        in output, output
    for line in re.findall(r"sweep: done .*", output):
        assert line.split(": ran ", 1)[1] == "dropout, finetune, report", line
    # Four experiments in the Git remote, fetched into the project, each once.
    refs = run(["git", "ls-remote", str(team["root"] / "origin.git"), "refs/exps/*"], repo,
               env).stdout
    assert sorted(re.findall(r"/(sweep-\w+-\d)$", refs, re.M)) == names, refs
    listed = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    shown = {exp.get("name") for entry in listed for exp in entry.get("experiments") or []}
    assert set(names) <= shown, shown
    # Four finished pipeline runs in MLflow, one per experiment, tagged with their worker.
    client = client_for(team["server"])
    experiment = client.get_experiment_by_name(TINY["mlflow"]["experiment"])
    pipelines = client.search_runs([experiment.experiment_id],
                                   "tags.run_kind = 'pipeline' and attributes.status = "
                                   "'FINISHED'")
    by_name = [run.data.tags.get("dvc_exp_name") for run in pipelines
               if run.data.tags.get("dvc_exp_name", "").startswith("sweep-")]
    assert sorted(by_name) == names, by_name
    assert {run.data.tags["worker"] for run in pipelines if "worker" in run.data.tags} \
        == {"w1", "w2"}
    # compare over the sweep: four configurations, its table printed.
    assert re.search(r"compare: compared 4 pipeline runs in 4 configurations \(swept: "
                     r"(dropout, l2|l2, dropout)\)", output), output
    table = output.split("compare: ", 1)[1]
    assert len(re.findall(r"^\| .* \| finetune \| 1 \|", table, re.M)) == 4, table


# ------------------------------------------------------------- the server stopped mid-stage
def test_a_server_stopped_mid_stage_fails_it_in_seconds_and_repro_recovers(team) -> None:
    server, a, env = team["server"], team["a"], team["env"]
    long_run = ["dvc", "exp", "run", "-S", "epochs=150", "-S", "patience=150", "dropout"]
    client = client_for(server)
    experiment = client.get_experiment_by_name("e2e").experiment_id
    log = team["root"] / "long-run.log"
    with open(log, "w") as output:  # a file, not a pipe: nobody reads it while it runs
        process = subprocess.Popen(long_run, cwd=a, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until the stage has logged a few epochs
            running = client.search_runs([experiment], "attributes.status = 'RUNNING' and "
                                         "tags.variant = 'dropout'")
            if running and len(client.get_metric_history(running[0].info.run_id,
                                                         "val_loss")) >= 3:
                break
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("the dropout stage never logged 3 epochs")
        server.stop()
        stopped = time.monotonic()
        process.wait(timeout=120)
        seconds = time.monotonic() - stopped
        output = log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert seconds < 40, seconds
    errors = [line for line in output.splitlines() if line.startswith("dropout: error:")]
    assert len(errors) == 1 and "stopped answering" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert not (a / "metrics" / "dropout.json").exists()  # no DVC output left
    assert not (a / "models" / "dropout").exists()
    server.start()
    recovered = run(["dvc", "repro", "dropout"], a, env)  # the stage, not what follows it
    assert "dropout" in stages_run(recovered.stdout)
    assert (a / "metrics" / "dropout.json").is_file()
    assert json.loads(run(["dvc", "status", "--json", "dropout"], a, env).stdout) == {}
    # The run the stopped stage left RUNNING was ended as KILLED by the next stage.
    lost = client.search_runs([experiment], "tags.variant = 'dropout' and "
                              "attributes.status = 'KILLED'")
    assert lost


def test_a_server_stopped_while_the_model_is_logged_leaves_no_output(team) -> None:
    """Outputs land only after the MLflow run ended: the server stopped while the transfer
    stage logs its model leaves no DVC output and the run unfinished; the next run of the
    stage completes and ends that run KILLED (the server could not be told before)."""
    server, a, env = team["server"], team["a"], team["env"]
    client = client_for(server)
    experiment = client.get_experiment_by_name("e2e").experiment_id
    log = team["root"] / "model-logging.log"
    with open(log, "w") as output:
        process = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "transfer"],
                                   cwd=a, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        stage_run = None
        while time.monotonic() < deadline:  # until the stage has begun logging its model
            running = client.search_runs([experiment], "attributes.status = 'RUNNING' and "
                                         "tags.variant = 'transfer'")
            if running:
                stage_run = running[0].info.run_id
                models = client.search_logged_models([experiment], filter_string=(
                    f"source_run_id = '{stage_run}'"))
                if models:
                    break
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        else:
            raise AssertionError("the transfer stage never began logging its model")
        server.stop()
        process.wait(timeout=120)
        output = log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("transfer: error:")]
    assert len(errors) == 1, output[-3000:]
    for path in ("metrics/transfer.json", "models/transfer", "artifacts/transfer",
                 "plots/transfer/history.csv"):
        assert not (a / path).exists(), path  # nothing published
    server.start()
    # The next run of the stage completes, and ends the run the lost stage left behind.
    recovered = run(["dvc", "repro", "--force", "--single-item", "transfer"], a, env)
    assert "transfer" in stages_run(recovered.stdout)
    assert (a / "metrics" / "transfer.json").is_file()
    assert json.loads((a / "artifacts" / "transfer" / "mlflow_run.json").read_text())[
        "run_id"] != stage_run
    assert client.get_run(stage_run).info.status in ("FAILED", "KILLED")
