"""The Dask side of ``foodtransfer sweep``: a client on a scheduler (or on a local cluster),
the resources a task asks for, and what each worker is executing (the driver's progress)."""

from __future__ import annotations

import subprocess

from foodtransfer.errors import UserError

SCHEDULER_ENV = "FOODTRANSFER_SCHEDULER"
CONNECT_TIMEOUT_S = 10


class SweepError(UserError):
    """A sweep that cannot start: a bad grid, uncommitted changes, no scheduler, no remote."""


def _gpus() -> int:
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def connect(scheduler: str | None, workers: int | None = None):
    """A Dask client on ``scheduler``, or on a new local cluster (one worker per GPU, else
    one; one thread each: one experiment at a time per worker). Returns (client, cluster or
    None)."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.scheduler.work-stealing": False})
    if scheduler:
        try:
            return Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s"), None
        except (OSError, TimeoutError, ValueError) as error:
            raise SweepError(f"cannot reach the Dask scheduler at {scheduler}: "
                             f"{str(error).splitlines()[0][:300]}. Start one (dask scheduler; "
                             "dask worker ADDRESS on each machine) or leave out --scheduler "
                             f"(and {SCHEDULER_ENV}) for a local cluster.") from None
    gpus = _gpus()
    count = workers or max(gpus, 1)
    cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True,
                           resources={"GPU": 1} if gpus else None, dashboard_address=":0",
                           host="127.0.0.1")
    return Client(cluster), cluster


def _gpu_resources(client) -> dict[str, int] | None:
    """One GPU per experiment where the cluster's workers declare GPUs."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def _executing_here(dask_worker) -> list[str]:
    return [str(task.key) for task in dask_worker.state.executing]


def executing(client) -> dict[str, list[str]]:
    """The tasks each worker (by name) is executing now (not those queued for it)."""
    try:
        by_address = client.run(_executing_here, on_error="return")
    except (OSError, TimeoutError):
        return {}
    names = {address: str(info.get("name", address))
             for address, info in client.scheduler_info().get("workers", {}).items()}
    return {names.get(address, address): keys for address, keys in by_address.items()
            if isinstance(keys, list)}
