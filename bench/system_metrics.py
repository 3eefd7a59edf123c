"""What MLflow's system metrics cost a training stage: the CPU time the sampler takes, measured
side by side in one process, alternating runs with and without it.

    python bench/system_metrics.py --seconds 30 --repeats 3

Each run is a real MLflow run in a scratch SQLite store, opened by the project's own
``tracked_run`` (as every training stage opens its run) while the main thread sleeps; the
process CPU time used during the run is the cost of everything MLflow does in the background:
with system metrics on, the sampler thread reading CPU, memory, disk and network and logging
them to the store. ``--interval`` is the sampling interval (the stages use 5 s); at a shorter
interval the per-sample cost is measured with more samples. Printed: per run kind the median
CPU seconds, the sampler's CPU seconds per sample and its share of one core at the stages'
interval. Figures go to bench/results/system_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))


def one_run(on: bool, seconds: float, interval: float) -> tuple[float, int]:
    """CPU seconds the process used while a tracked run was open for ``seconds``, and the
    number of samples the sampler logged."""
    import mlflow

    from foodtransfer.tracking.runs import tracked_run

    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(interval)
    mlflow.set_system_metrics_sampling_interval(interval)
    with tracked_run("bench-system-metrics", "idle", "variant", {}, {},
                     system_metrics=on) as run:
        started = time.process_time()
        time.sleep(seconds)
        used = time.process_time() - started
        run_id = run.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "system/cpu_utilization_percentage")
    return used, len(history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" /
                        "system_metrics.json")
    args = parser.parse_args()
    from foodtransfer.tracking.runs import SYSTEM_METRICS_INTERVAL

    with tempfile.TemporaryDirectory() as root:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(root) / 'mlflow.db'}"
        os.chdir(root)
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        samples: list[int] = []
        one_run(True, 2.0, args.interval)  # warm-up: schema, imports, psutil's first read
        for repeat in range(args.repeats):
            for kind in ("off", "on"):
                used, count = one_run(kind == "on", args.seconds, args.interval)
                cpu[kind].append(used)
                if kind == "on":
                    samples.append(count)
                print(f"repeat {repeat + 1}, system metrics {kind}: {used:.3f} CPU s "
                      f"in {args.seconds:.0f} s" + (f", {count} samples" if count else ""),
                      flush=True)
    medians = {kind: statistics.median(values) for kind, values in cpu.items()}
    per_sample = (medians["on"] - medians["off"]) / statistics.median(samples)
    share = per_sample / SYSTEM_METRICS_INTERVAL
    result = {"seconds": args.seconds, "interval": args.interval, "repeats": args.repeats,
              "cpu_seconds": cpu, "samples": samples, "median_cpu_seconds": medians,
              "cpu_seconds_per_sample": per_sample,
              "share_of_one_core_at_stage_interval": share,
              "stage_interval_s": SYSTEM_METRICS_INTERVAL}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median CPU during {args.seconds:.0f} s: off {medians['off']:.3f} s, "
          f"on {medians['on']:.3f} s ({statistics.median(samples)} samples)")
    print(f"sampler: {per_sample * 1000:.1f} ms CPU per sample -> "
          f"{share * 100:.2f} % of one core at the stages' {SYSTEM_METRICS_INTERVAL:.0f} s "
          f"interval")


if __name__ == "__main__":
    main()
