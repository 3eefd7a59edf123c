"""The whole pipeline at the reference size, timed stage by stage, with the GPU's load.

`make bench-gpu` (= python bench/gpu.py) builds a fresh project on the generated sample at the
reference report's size (20 classes x 256 images at 256 px, EfficientNetV2B0 with random
weights: the same compute as ImageNet weights, no download), trains 100 head epochs (early
stopping off), 10 fine-tune epochs and 20 baseline epochs, runs `dvc repro`, and prints per
stage the wall time, images/s where it applies, the mean GPU utilisation and the peak GPU
memory (sampled with nvidia-ml-py every 0.5 s), next to the reference: about 28 minutes of
training on the authors' GPU (100 x 13 s + 10 x 40 s). Our goal: the whole `dvc repro` under
5 minutes on one H100. Figures go to bench/results/gpu.json.

    python bench/gpu.py                       # the reference size (needs a GPU to be quick)
    python bench/gpu.py --classes 2 --per-class 16 --image-size 64 --epochs 2  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))
REFERENCE_TRAINING_S = 100 * 13 + 10 * 40  # the course report: head epochs, fine-tune epochs
GOAL_S = 5 * 60


class GpuSampler(threading.Thread):
    """Utilisation (%) and used memory (MiB) of every GPU every ``interval`` seconds, as
    (time, utilisation summed over GPUs, memory summed) samples; none without a GPU or
    nvidia-ml-py."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
            self.names = [pynvml.nvmlDeviceGetName(h) for h in self.handles]
            self.available = bool(self.handles)
        except Exception:  # no driver, no GPU, no nvidia-ml-py
            self.handles, self.names = [], []

    def run(self) -> None:
        import pynvml

        while not self.stop.wait(self.interval):
            utilisation = sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles)
            memory = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles) / 2**20
            self.samples.append((time.monotonic(), utilisation, memory))


def reference_params(args) -> dict:
    from foodtransfer.config import DEFAULT_CLASSES

    return {
        "image_size": args.image_size, "backbone": "EfficientNetV2B0", "weights": "none",
        "epochs": args.epochs, "patience": args.epochs + 1,  # every epoch runs
        "data": {"source": "sample", "classes": list(DEFAULT_CLASSES[:args.classes]),
                 "samples_per_class": args.per_class, "test_per_class": args.test_per_class,
                 "sample": {"train_per_class": args.per_class + 3,
                            "test_per_class": args.test_per_class,
                            "min_side": args.image_size, "max_side": 2 * args.image_size}},
        "baseline": {"epochs": args.baseline_epochs},
        "finetune": {"epochs": args.finetune_epochs},
        "mlflow": {"experiment": "bench-gpu"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--baseline-epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()

    from test_pipeline_e2e import make_repo

    sampler = GpuSampler()
    with tempfile.TemporaryDirectory() as root:
        repo, env = make_repo(Path(root), reference_params(args))
        if sampler.available:
            sampler.start()
        started = time.monotonic()
        marks: list[tuple[str, float]] = []
        lines: list[str] = []
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:  # stage boundaries as they happen
            lines.append(line)
            match = re.match(r"Running stage '([a-z]+)'", line)
            if match:
                marks.append((match.group(1), time.monotonic()))
            if os.environ.get("BENCH_VERBOSE"):
                sys.stdout.write(line)
        process.wait()
        total = time.monotonic() - started
        sampler.stop.set()
        output = "".join(lines)
        if process.returncode != 0:
            raise SystemExit(f"dvc repro failed:\n{output[-4000:]}")
        features = json.loads((repo / "metrics" / "features.json").read_text())
    seconds = {name: float(value) for name, value in
               re.findall(r"^([a-z]+): .*\[([0-9.]+)s\]$", output, flags=re.MULTILINE)}
    bounds = marks + [("end", started + total)]
    rows = []
    for (name, begin), (_, end) in zip(bounds, bounds[1:]):
        window = [s for s in sampler.samples if begin <= s[0] < end]
        rows.append({"stage": name, "wall_s": round(end - begin, 1),
                     "stage_s": seconds.get(name),
                     "gpu_util_mean": (round(sum(s[1] for s in window) / len(window), 1)
                                       if window else None),
                     "gpu_memory_peak_mib": (round(max(s[2] for s in window))
                                             if window else None)})
    training = sum(row["wall_s"] for row in rows
                   if row["stage"] in ("baseline", "transfer", "dropout", "finetune"))
    result = {"device": ", ".join(sampler.names) or "no GPU (nvidia-ml-py found none)",
              "params": reference_params(args), "stages": rows, "total_s": round(total, 1),
              "training_s": round(training, 1),
              "features_images_per_s": features.get("images_per_second"),
              "reference_training_s": REFERENCE_TRAINING_S, "goal_s": GOAL_S}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device: {result['device']}")
    print("| stage | wall time | GPU utilisation (mean) | GPU memory (peak) |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        util = "-" if row["gpu_util_mean"] is None else f"{row['gpu_util_mean']:.0f} %"
        memory = "-" if row["gpu_memory_peak_mib"] is None else \
            f"{row['gpu_memory_peak_mib']:,} MiB"
        print(f"| {row['stage']} | {row['wall_s']:.1f} s | {util} | {memory} |")
    print(f"| **dvc repro** | **{total:.0f} s** | | |")
    print(f"features: {features.get('images_per_second')} images/s")
    print(f"training stages {training:.0f} s against the reference's ~{REFERENCE_TRAINING_S} s "
          f"of training ({REFERENCE_TRAINING_S / max(training, 1e-9):.1f}x); the whole run "
          f"{total:.0f} s against the goal of {GOAL_S} s ({'met' if total <= GOAL_S else 'not met'})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
