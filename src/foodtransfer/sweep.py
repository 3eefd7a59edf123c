"""``foodtransfer sweep``: a grid of DVC experiments on the workers of a Dask cluster.

The grid is DVC's own (``-S 'seed=1,2' -S 'dropout=0.3,0.6'``, expanded by DVC's Hydra
sweeper, as ``dvc exp run --queue`` expands it). Each combination is one Dask task, scheduled
by Dask (its retries when a worker dies, its resources: one ``GPU`` per task where the workers
declare GPUs, its dashboard); this module writes no scheduler. A task:

1. clones the project's Git remote at the sweep's commit (pushed there by the driver under
   ``refs/foodtransfer/sweeps/<id>``) into a temporary folder on the worker;
2. runs ``dvc exp run --pull -n <name> -S ...``: what an earlier run computed (the stages no
   swept param reaches, such as the data and the features, which the driver computes once
   before the fan-out and pushes with DVC's run cache) comes from the DVC remote instead of
   being computed again;
3. logs to the shared MLflow tracking server (tag ``worker``: the Dask worker);
4. pushes the experiment (``dvc exp push``) to the Git remote and its outputs to the DVC remote.

The driver prints progress (done, running with the worker, waiting, failed), fetches the
experiments (``dvc exp pull --no-cache``) and ends with ``foodtransfer compare`` over the sweep.
A failed experiment reports its last lines; it is not retried (it would fail again). A task whose
worker dies is retried on another by Dask; the experiment's name is fixed by the driver and its
push is the task's last step, so an experiment lands once.

Without ``--scheduler`` (or ``FOODTRANSFER_SCHEDULER``) the sweep starts a local Dask cluster
(one worker per GPU, else one): the clones then share the project's DVC cache, log to the
project's store and push their experiments into the project itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foodtransfer.dag import (direct_upstream, load_stages, params_read, uncached_outputs,
                              upstream)
from foodtransfer.sweep_cluster import (SCHEDULER_ENV, SweepError, _gpu_resources, connect,
                                        executing)

SWEEP_REFS = "refs/foodtransfer/sweeps"
LAST_LINES = 15


class TrialFailed(Exception):
    """One experiment of the sweep failed (its last lines are in the message)."""


@dataclass(frozen=True)
class Trial:
    name: str  # the DVC experiment name
    overrides: tuple[str, ...]  # key=value, as dvc exp run -S takes them

    def label(self) -> str:
        return ", ".join(self.overrides)


@dataclass
class Plan:
    """What each task needs: where to clone from, where to push, where to log."""

    commit: str
    sweep_ref: str
    git_remote: str  # a URL or path the workers clone from and push to
    tracking_uri: str
    dvc_remote: str | None = None  # None: the clones share the project's DVC cache
    shared_cache: str | None = None
    targets: list[str] = field(default_factory=list)
    # dvc.lock and the uncached outputs (metrics files) of the stages computed before the
    # fan-out, written into each clone: DVC's run cache cannot restore a stage with an
    # uncached output, its lock entry can.
    overlay: dict[str, bytes] = field(default_factory=dict)  # bytes: CSVs end lines in \r\n


# ------------------------------------------------------------------------------- the grid
def trials(sets: list[str], prefix: str) -> list[Trial]:
    """DVC's expansion of the ``-S`` grid, one named trial per combination."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    if not sets:
        raise SweepError("nothing to sweep: give at least one -S KEY=V1,V2 "
                         "(e.g. -S 'seed=1,2' -S 'dropout=0.3,0.6').")
    bad = [item for item in sets if "=" not in item]
    if bad:
        raise SweepError(f"-S {bad[0]!r} is not KEY=VALUE[,VALUE...] (e.g. -S 'seed=1,2').")
    try:
        combinations = get_hydra_sweeps(to_path_overrides(sets))
    except Exception as error:  # Hydra's parser errors have no common base
        raise SweepError(f"cannot read the grid {sets}: {error}") from None
    return [Trial(f"{prefix}-{index}", tuple(combination["params.yaml"]))
            for index, combination in enumerate(combinations, 1)]


# ---------------------------------------------------------------------------- the project
def _git(project: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise SweepError(f"git {' '.join(args)} failed: {result.stderr.strip()[-500:]}")
    return result.stdout.strip()


def sweep_commit(project: Path) -> str:
    """HEAD, after checking that nothing tracked differs from it: the workers run the commit,
    so what is not committed would not run."""
    dirty = [line for line in _git(project, "status", "--porcelain",
                                   "--untracked-files=no").splitlines() if line.strip()]
    if dirty:
        raise SweepError(f"uncommitted changes ({', '.join(d[3:] for d in dirty[:5])}): the "
                         "workers run the committed project; commit them (git commit -am ...) "
                         "or stash them first.")
    return _git(project, "rev-parse", "HEAD")


def default_dvc_remote(project: Path) -> str | None:
    result = subprocess.run(["dvc", "remote", "default"], cwd=project, capture_output=True,
                            text=True, timeout=120)
    return result.stdout.strip() or None if result.returncode == 0 else None


def shared_stages(project: Path, swept: set[str], targets: list[str] | None = None
                  ) -> list[str]:
    """The stages of dvc.yaml that neither read a swept param nor depend on a stage that does:
    every experiment of the sweep has the same outputs there, computed once. With
    ``targets``, only those the targets need (the sweep runs nothing else)."""
    stages = load_stages(project)
    unknown = [name for name in targets or [] if name not in stages]
    if unknown:
        raise SweepError(f"unknown stage {unknown[0]!r}: the stages of dvc.yaml are "
                         f"{', '.join(stages)}.")
    needed = set(upstream(stages, list(targets))) if targets else set(stages)

    def reads_swept(name: str) -> bool:
        return any(key == "*" or key == s or s.startswith(key + ".") or key.startswith(s + ".")
                   for key in params_read(stages[name]) for s in swept)

    varies: dict[str, bool] = {}

    def depends_on_sweep(name: str) -> bool:
        if name not in varies:
            varies[name] = True  # a cycle is not a DAG: treat as varying
            varies[name] = reads_swept(name) or any(
                map(depends_on_sweep, direct_upstream(stages, name)))
        return varies[name]

    return [name for name in stages if name in needed and not depends_on_sweep(name)]


def overlay_files(project: Path, names: list[str]) -> dict[str, bytes]:
    paths = ["dvc.lock", *uncached_outputs(load_stages(project), names)]
    return {path: (project / path).read_bytes() for path in paths
            if (project / path).is_file()}


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tail(text: str, lines: int = LAST_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# -------------------------------------------------------------------------------- the task
REPORT_STAGE, REPORT_RUN_FILE = "report", "reports/run.json"  # stages/report.py's RUN_FILE


def own_pipeline_run(clone: Path, targets: list[str]) -> str | None:
    """The pipeline run of the experiment that just ran in ``clone``: the one its report
    stage names in ``reports/run.json`` (its own run, or the one DVC restored the report of,
    from identical inputs), or None when the targets stop before the report (what the clone
    holds there is then the commit's, not the experiment's)."""
    import json

    stages = load_stages(clone)
    if targets and REPORT_STAGE not in upstream(stages, targets):
        return None
    path = clone / REPORT_RUN_FILE
    return json.loads(path.read_text())["pipeline_run_id"] if path.is_file() else None


def run_trial(plan: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """One experiment, on a worker: clone, ``dvc exp run --pull``, ``dvc exp push``."""
    from distributed import get_worker

    try:
        worker = str(get_worker().name)
    except ValueError:  # not on a worker (a direct call)
        worker = os.uname().nodename
    started = time.time()
    name, overrides = trial["name"], trial["overrides"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": plan["tracking_uri"],
           "FOODTRANSFER_WORKER": worker}
    env.pop("DVC_ROOT", None)
    with tempfile.TemporaryDirectory(prefix=f"foodtransfer-{name}-") as folder:
        clone = Path(folder) / "project"

        def step(command: list[str], what: str) -> str:
            result = _run(command, clone if clone.exists() else Path(folder), env)
            if result.returncode != 0:
                raise TrialFailed(f"{name} ({', '.join(overrides)}) on {worker}: {what} "
                                  f"failed with exit code {result.returncode}:\n"
                                  f"{_tail(result.stdout + result.stderr)}")
            return result.stdout

        step(["git", "clone", "--quiet", "--no-checkout", plan["git_remote"], str(clone)],
             "git clone")
        step(["git", "fetch", "--quiet", "origin", plan["sweep_ref"]], "git fetch")
        step(["git", "checkout", "--quiet", "--detach", plan["commit"]], "git checkout")
        for relative, content in plan["overlay"].items():
            target = clone / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        if plan["shared_cache"]:  # one machine: the project's cache is this clone's
            step(["dvc", "cache", "dir", "--local", plan["shared_cache"]], "dvc cache dir")
            step(["dvc", "checkout", "--allow-missing"], "dvc checkout")
        else:  # the inputs (data, weights) and what was computed, from the DVC remote
            step(["dvc", "remote", "add", "--local", "--force", "--default", "sweep",
                  plan["dvc_remote"]], "dvc remote add")
            step(["dvc", "pull", "--allow-missing"], "dvc pull")
        output = step(["dvc", "exp", "run", *([] if plan["shared_cache"] else ["--pull"]),
                       "-n", name, *[arg for item in overrides for arg in ("-S", item)],
                       *plan["targets"]], "dvc exp run")
        pipeline_run = own_pipeline_run(clone, plan["targets"])
        step(["dvc", "exp", "push", "--force", *(["--no-cache"] if plan["shared_cache"] else
                                                   ["--run-cache"]),
              "origin", name], "dvc exp push")
    return {"name": name, "worker": worker, "started": started,
            "seconds": time.time() - started,
            "ran": list(dict.fromkeys(re.findall(r"Running stage '([\w-]+)'", output))),
            # The pipeline run of its results: its own, or the one DVC reused them from.
            "pipeline_run": pipeline_run}


# ------------------------------------------------------------------------------ the driver
@dataclass
class Outcome:
    done: list[dict[str, Any]]
    failed: list[str]


def fan_out(client, plan: Plan, grid: list[Trial], echo: Callable[[str], None],
            poll_s: float = 2.0) -> Outcome:
    """Submit one task per trial and follow them to the end, printing each change. A result
    is released as soon as it is read: Dask recomputes the results a dead worker held while a
    client still holds their futures, which would run a finished experiment again."""
    resources = _gpu_resources(client)
    pending = {client.submit(run_trial, asdict(plan), asdict(trial), key=f"{trial.name}",
                             pure=False, resources=resources): trial for trial in grid}
    names = {trial.name for trial in grid}
    done: list[dict[str, Any]] = []
    failed: list[str] = []
    last = ""
    while pending:
        for future, trial in list(pending.items()):
            if future.status not in ("finished", "error", "cancelled"):
                continue
            if future.status == "finished":
                result = future.result()
                done.append(result)
                echo(f"sweep: done {trial.name} ({trial.label()}) on worker {result['worker']} "
                     f"in {result['seconds']:.0f} s: ran {', '.join(result['ran']) or 'nothing'}")
            else:
                error = future.exception() if future.status == "error" else "cancelled"
                failed.append(trial.name)
                echo(f"sweep: FAILED {trial.name} ({trial.label()}): {error}")
            del pending[future]
            future.release()
        running = {key: worker for worker, keys in executing(client).items()
                   for key in keys if key in names}
        line = (f"sweep: {len(done)} done, {len(running)} running"
                + (" (" + ", ".join(f"{k} on worker {w}" for k, w in sorted(running.items()))
                   + ")" if running else "")
                + f", {len(pending) - len(running)} waiting, {len(failed)} failed")
        if line != last:
            echo(line)
            last = line
        if pending:
            time.sleep(poll_s)
    return Outcome(done, failed)


def sweep(sets: list[str], project: Path, *, scheduler: str | None = None,
          workers: int | None = None, targets: list[str] | None = None,
          git_remote: str | None = None, dvc_remote: str | None = None,
          echo: Callable[[str], None] = print) -> Outcome:
    """Run the grid ``sets`` as DVC experiments on a Dask cluster; see the module's doc."""
    from foodtransfer.tracking.store import tracking_uri

    project = project.resolve()
    sweep_id = uuid.uuid4().hex[:6]
    grid = trials(sets, f"sweep-{sweep_id}")
    commit = sweep_commit(project)
    scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
    uri = tracking_uri()
    if scheduler:  # other machines: everything goes through remotes and a tracking server
        git_remote = git_remote or _git(project, "remote", "get-url", "origin", check=False)
        dvc_remote = dvc_remote or _remote_url(project, default_dvc_remote(project))
        missing = [what for what, value in (
            ("a Git remote (git remote add origin URL, or --git-remote)", git_remote),
            ("a DVC remote (dvc remote add -d NAME URL, or --dvc-remote)", dvc_remote),
            ("an MLflow tracking server (MLFLOW_TRACKING_URI=http://...)",
             uri.startswith(("http://", "https://")))) if not value]
        if missing:
            raise SweepError(f"a sweep on {scheduler} needs {'; '.join(missing)}: its workers "
                             "clone, pull, push and log through them.")
        shared_cache = None
    else:
        git_remote, shared_cache = str(project), str(_cache_dir(project))
        dvc_remote = None
    from foodtransfer.tracking.store import check_login

    check_login(uri)  # a team server's login, before a cluster starts or anything is pushed
    client, cluster = connect(scheduler, workers)  # before anything is computed or pushed
    try:
        names = ", ".join(str(w.get("name", a)) for a, w in
                          client.scheduler_info().get("workers", {}).items())
        echo(f"sweep: {len(grid)} experiments on {scheduler or 'a local Dask cluster'} "
             f"(workers: {names or 'none yet'}; dashboard {client.dashboard_link})")
        swept = {item.split("=", 1)[0] for item in sets}
        shared = shared_stages(project, swept, targets)
        if shared:
            echo(f"sweep: computing {', '.join(shared)} once, before the fan-out")
            _checked(["dvc", "repro", *shared], project)
        if dvc_remote:
            echo(f"sweep: pushing their outputs and the run cache to {dvc_remote}")
            _checked(["dvc", "push", "--run-cache", "-r", _remote_name(project, dvc_remote)],
                     project)
        sweep_ref = f"{SWEEP_REFS}/{sweep_id}"
        _git(project, "push", "--quiet", git_remote, f"{commit}:{sweep_ref}")
        plan = Plan(commit, sweep_ref, git_remote, uri, dvc_remote, shared_cache,
                    list(targets or []), overlay_files(project, shared))
        outcome = fan_out(client, plan, grid, echo)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if scheduler and outcome.done:
        _checked(["dvc", "exp", "pull", "--no-cache", "--force", git_remote,
                  *[item["name"] for item in outcome.done]], project)
    return outcome


def _cache_dir(project: Path) -> Path:
    result = _run(["dvc", "cache", "dir"], project, timeout=120)
    return Path(result.stdout.strip() or project / ".dvc" / "cache").resolve()


def _remote_url(project: Path, name: str | None) -> str | None:
    if not name:
        return None
    result = _run(["dvc", "remote", "list"], project, timeout=120)
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return parts[1]
    return None


def _remote_name(project: Path, url: str) -> str:
    """The project's DVC remote at ``url``, added (local config) as ``sweep`` if it has none."""
    result = _run(["dvc", "remote", "list"], project, timeout=120)
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == url:
            return parts[0]
    _checked(["dvc", "remote", "add", "--local", "--force", "sweep", url], project)
    return "sweep"


def _checked(command: list[str], project: Path) -> None:
    result = _run(command, project)
    if result.returncode != 0:
        raise SweepError(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                         f"{_tail(result.stdout + result.stderr)}")

