"""What `foodtransfer sweep` costs against DVC's queue (`make seeds`' way), side by side in one
run: the same 4 tiny experiments (the generated sample, the suite's stand-in backbone, a 2 x 2
grid of the head's dropout and l2, so each experiment runs dropout, finetune and the report)
through `dvc exp run --queue ... && dvc exp run --run-all -j 1`, then through `foodtransfer
sweep` on a local Dask cluster of one worker; wall time, the engine's overhead per experiment,
the time to the first task, and the memory (RSS) of the scheduler (in the driver's process)
and of the worker process.

    python bench/sweep.py            # ~15 min on 2 cores; figures to bench/results/sweep.json

The two halves use other l2 values, so that neither restores the other's stages from DVC's
run cache; the whole pipeline runs once (and is committed) before both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))


class PeakRss:
    """The peak RSS of this process (scheduler and client) and of each Dask worker process
    (not the experiments it starts), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for child in me.children(recursive=False):
                try:
                    if "distributed" in " ".join(child.cmdline()) or \
                            "spawn" in " ".join(child.cmdline()):
                        self.worker = max(self.worker, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=PROJECT / "bench" / "results" / "sweep.json")
    args = parser.parse_args()
    out = args.out.resolve()

    import os

    from standin import standin_weights
    from test_pipeline_e2e import TINY, make_repo, run

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        repo, env = make_repo(Path(folder), TINY, standin_weights())
        run(["dvc", "repro"], repo, env)  # the stages the grid does not reach, once
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "pipeline"], repo, env)

        started = time.perf_counter()
        run(["dvc", "exp", "run", "--queue", "-S", "dropout=0.3,0.5", "-S",
             "l2=0.0001,0.001"], repo, env)
        run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo, env, timeout=3600)
        queue_s = time.perf_counter() - started
        run(["git", "checkout", "--", "."], repo, env)

        from foodtransfer.sweep import sweep

        os.chdir(repo)
        os.environ.update(env)
        os.environ.pop("PYTHONPATH", None)  # the driver is this checkout; the tasks, the clone's
        lines: list[tuple[float, str]] = []
        started = time.perf_counter()
        started_wall = time.time()
        with PeakRss() as rss:
            outcome = sweep(["dropout=0.3,0.5", "l2=0.0002,0.002"], repo,
                            echo=lambda line: lines.append((time.perf_counter(), line)))
        sweep_s = time.perf_counter() - started
    assert not outcome.failed and len(outcome.done) == 4, outcome
    per_experiment = [item["seconds"] for item in outcome.done]
    first_task_s = min(item["started"] for item in outcome.done) - started_wall
    overhead = (sweep_s - queue_s) / 4
    # A 4-worker cluster (one machine each): the experiments in parallel, after the same time
    # to the first task; the driver's collection is in the per-experiment times' spread.
    four_workers_s = first_task_s + max(per_experiment) + (sweep_s - first_task_s
                                                           - sum(per_experiment))
    result = {"experiments": 4, "queue_s": queue_s, "sweep_s": sweep_s,
              "overhead_per_experiment_s": overhead,
              "sweep_task_median_s": statistics.median(per_experiment),
              "queue_per_experiment_s": queue_s / 4,
              "time_to_first_task_s": first_task_s,
              "projected_4_workers_s": four_workers_s,
              "projected_speedup_4_workers": queue_s / four_workers_s,
              "driver_scheduler_peak_rss_mb": rss.driver / 2**20,
              "worker_peak_rss_mb": rss.worker / 2**20,
              "lines": [f"{t - started:7.1f} s  {line}" for t, line in lines]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| | DVC queue (make seeds) | foodtransfer sweep (local cluster, 1 worker) |")
    print("| --- | ---: | ---: |")
    print(f"| 4 tiny experiments, wall | {queue_s:.0f} s | {sweep_s:.0f} s |")
    print(f"| per experiment | {queue_s / 4:.0f} s | {sweep_s / 4:.0f} s (task median "
          f"{statistics.median(per_experiment):.0f} s) |")
    print(f"overhead of the engine per experiment: {overhead:+.1f} s; time to the first task: "
          f"{first_task_s:.1f} s; projected on 4 workers: {four_workers_s:.0f} s "
          f"({queue_s / four_workers_s:.1f}x the queue)")
    print(f"peak RSS: driver with the scheduler {rss.driver / 2**20:.0f} MB, a worker process "
          f"{rss.worker / 2**20:.0f} MB")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
