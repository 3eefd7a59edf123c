"""`foodtransfer sweep` on a real Dask cluster, on loopback: a scheduler and two worker
processes (two "machines"), a bare Git remote, a local-folder DVC remote and a real `mlflow
server`, the tiny generated-sample pipeline. A 2 x 2 grid lands as four DVC experiments and four
pipeline runs, compare aggregates them; one worker is killed (with everything it started) in
the middle of a task, and the sweep still completes with every experiment once. An unreachable
scheduler is one clear line, exit code 2, nothing half-done.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import free_port, start_server, stop_process_group
from test_pipeline_e2e import TINY, make_repo, run
from test_team import TrackingServer, client_for, git

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# The head's params: the driver computes data, features, baseline and transfer once, and each
# experiment runs dropout, finetune and the report (a seed grid would re-run every stage).
GRID = ["-S", "dropout=0.3,0.6", "-S", "l2=0.0001,0.001"]


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
def cluster(tmp_path_factory: pytest.TempPathFactory, standin_weights: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("sweep")
    server = TrackingServer(root / "server")
    server.start()
    dask = None
    try:
        (root / "a").mkdir()
        repo, env = make_repo(root / "a", TINY, standin_weights)
        env = {**env, "MLFLOW_TRACKING_URI": server.url,
               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "5"}
        origin = root / "origin.git"
        run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root, env)
        git(repo, env, "remote", "add", "origin", str(origin))
        run(["dvc", "remote", "add", "-d", "storage", str(root / "dvc-remote")], repo, env)
        run(["dvc", "push"], repo, env)  # the weights
        git(repo, env, "add", "-A")
        git(repo, env, "commit", "-qm", "remotes")
        git(repo, env, "push", "-q", "origin", "main")
        dask = DaskCluster(root, env)
        dask.start(["w1", "w2"])
        yield {"repo": repo, "env": env, "server": server, "origin": origin, "dask": dask}
    finally:
        if dask is not None:
            dask.stop()
        server.stop()


def test_an_unreachable_scheduler_is_one_line_and_leaves_nothing(cluster) -> None:
    repo, env, origin = cluster["repo"], cluster["env"], cluster["origin"]
    lock_before = (repo / "dvc.lock").read_bytes() if (repo / "dvc.lock").exists() else None
    started = time.monotonic()
    result = subprocess.run([str(BIN / "foodtransfer"), "sweep", *GRID, "--scheduler",
                             f"tcp://127.0.0.1:{free_port()}"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "foodtransfer sweep: error: cannot reach the Dask scheduler at tcp://127.0.0.1:" \
        in result.stderr and "leave out --scheduler" in result.stderr
    assert time.monotonic() - started < 60
    refs = run(["git", "ls-remote", str(origin)], repo, env).stdout
    assert "refs/foodtransfer" not in refs and "refs/exps" not in refs, refs
    assert not (repo / "data" / "trimmed").exists()  # nothing computed
    assert ((repo / "dvc.lock").read_bytes() if (repo / "dvc.lock").exists() else None) \
        == lock_before
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env).stdout == ""


def test_a_grid_lands_once_each_though_a_worker_dies_mid_task(cluster) -> None:
    repo, env, dask = cluster["repo"], cluster["env"], cluster["dask"]
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
    refs = run(["git", "ls-remote", str(cluster["origin"]), "refs/exps/*"], repo, env).stdout
    assert sorted(re.findall(r"/(sweep-\w+-\d)$", refs, re.M)) == names, refs
    listed = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    shown = {exp.get("name") for entry in listed for exp in entry.get("experiments") or []}
    assert set(names) <= shown, shown
    # Four finished pipeline runs in MLflow, one per experiment, tagged with their worker.
    client = client_for(cluster["server"])
    experiment = client.get_experiment_by_name(TINY["mlflow"]["experiment"])
    pipelines = client.search_runs([experiment.experiment_id],
                                   "tags.run_kind = 'pipeline' and attributes.status = "
                                   "'FINISHED'")
    by_name = [run.data.tags.get("dvc_exp_name") for run in pipelines]
    assert sorted(by_name) == names, by_name
    assert {run.data.tags["worker"] for run in pipelines} == {"w1", "w2"}
    # compare over the sweep: four configurations, its table printed.
    assert re.search(r"compare: compared 4 pipeline runs in 4 configurations \(swept: "
                     r"(dropout, l2|l2, dropout)\)", output), output
    table = output.split("compare: ", 1)[1]
    assert len(re.findall(r"^\| .* \| finetune \| 1 \|", table, re.M)) == 4, table
