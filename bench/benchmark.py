"""Side-by-side benchmark of the pipeline's speed and memory on this machine.

    .venv/bin/python bench/benchmark.py [--classes 20] [--per-class 32] [--image-size 256]

Runs, in one process tree and one run, on a generated sample (20 classes at 256 px by
default), and prints a table of medians and ratios:

1. head training, the reference way (frozen backbone inside the model, image batches every
   epoch) against ours (features cached once), projected to 100 epochs;
2. feature-extraction throughput of the features code path (reading the stored images)
   against raw ``model.predict`` on in-memory tensors;
3. iteration latency: ``dvc exp run -S dropout=0.5`` after a full ``dvc repro``, per stage;
4. peak RSS (process tree) of the trim and features stages for N and 4N images;
5. fine-tune epoch time with the frozen bottom cached against full backbone passes.

Figures go to stdout and to ``bench/results/benchmark.json``. Weights are random
(``weights=none``): the compute is the same as with ImageNet weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_rss_mb(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run ``command`` and return the peak summed RSS of its process tree (MiB)."""
    import psutil

    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed: {process.stderr.read()[-2000:]}")
    return peak / 2**20


def make_project(root: Path, params: dict) -> tuple[Path, dict[str, str]]:
    from test_pipeline_e2e import make_repo

    root.mkdir(parents=True, exist_ok=True)
    return make_repo(root, params)


def stage_command(repo: Path, stage: str) -> list[str]:
    """The stage's command line as dvc.yaml gives it (the paths come from there)."""
    return shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"])


def stage_seconds(output: str) -> dict[str, float]:
    """Per-stage wall time from the stages' summary lines ('<stage>: ... [12.3s]')."""
    return {name: float(seconds) for name, seconds in
            re.findall(r"^([a-z]+): .*\[([0-9.]+)s\]$", output, flags=re.MULTILINE)}


def bench_head_and_features(args, repo: Path, results: dict) -> None:
    import keras
    import numpy as np

    from foodtransfer.data.datasets import image_dataset
    from foodtransfer.data.manifests import load_splits
    from foodtransfer.models.classifiers import (build_feature_extractor, build_head,
                                                 build_image_classifier)
    from foodtransfer.models.inference import compile_forward
    from foodtransfer.stages.features import extract_features
    from foodtransfer.training.loop import array_dataset, compile_classifier, make_optimizer

    keras.utils.set_random_seed(0)
    trimmed, splits = repo / "data/trimmed", load_splits(repo / "data/split")
    extractor = build_feature_extractor(args.backbone, "none", args.image_size)
    train = splits["train"]
    images = len(train) + len(splits["val"]) + len(splits["test"])

    # 2. Feature extraction: the features code path against model.predict on tensors.
    # Both sides are timed after their one-time trace (the stage pays it once: seconds).
    out = Path(tempfile.mkdtemp(dir=repo))
    forward = compile_forward(extractor)
    started = time.perf_counter()
    forward(np.zeros(forward.input_signature[0].shape, "uint8"))
    trace_seconds = time.perf_counter() - started
    path_seconds = median_time(lambda: extract_features(
        extractor, trimmed, splits, out / "f", metadata={}, forward=forward,
        show_progress=False), args.repeats)
    # The limit: the same number of images as in-memory tensors, no reading at all, both
    # through Keras' model.predict and through the stage's compiled forward pass; the faster
    # of the two. A whole number of batches, warmed up on the same array (every trace done).
    in_memory = (images // 32) * 32
    batch = np.random.default_rng(0).integers(0, 256, (in_memory, args.image_size,
                                                       args.image_size, 3), dtype=np.uint8)
    as_float = batch.astype("float32")
    extractor.predict(as_float, batch_size=32, verbose=0)  # warm-up (tracing)
    predict_seconds = median_time(lambda: extractor.predict(as_float, batch_size=32,
                                                            verbose=0), args.repeats)
    forward_seconds = median_time(lambda: [forward(batch[i:i + 32]).numpy()
                                           for i in range(0, in_memory, 32)], args.repeats)
    limit = in_memory / min(predict_seconds, forward_seconds)
    results["features"] = {
        "images": images, "pipeline_images_per_s": images / path_seconds,
        "raw_predict_images_per_s": in_memory / predict_seconds,
        "raw_forward_images_per_s": in_memory / forward_seconds,
        "limit_images_per_s": limit, "trace_seconds": trace_seconds,
        "ratio_of_limit": images / path_seconds / limit}

    # 1. Head training: reference (backbone inside, images every epoch) against cached.
    classes = len(set(train.labels.tolist()))
    features = np.load(out / "f" / "train.npy")
    val_features = np.load(out / "f" / "val.npy")
    head = build_head(features.shape[1], classes, dropout=0.6, l1=1e-5, l2=1e-5)
    compile_classifier(head, make_optimizer("nadam", 1e-3), classes)
    train_ds = array_dataset(features, train.labels, 32, shuffle=True)
    val_ds = array_dataset(val_features, splits["val"].labels, 32)
    head.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0)  # warm-up
    cached_100 = median_time(lambda: head.fit(train_ds, validation_data=val_ds, epochs=100,
                                              verbose=0), 1)
    reference = build_image_classifier(
        extractor, build_head(features.shape[1], classes, dropout=0.6, l1=1e-5, l2=1e-5))
    compile_classifier(reference, make_optimizer("nadam", 1e-3), classes)
    image_train = image_dataset(trimmed, train, 32, shuffle=True)
    image_val = image_dataset(trimmed, splits["val"], 32)
    reference.fit(image_train, validation_data=image_val, epochs=1, verbose=0)  # warm-up
    reference_epoch = median_time(lambda: reference.fit(
        image_train, validation_data=image_val, epochs=1, verbose=0), args.repeats)
    extraction_train_val = path_seconds * (len(train) + len(splits["val"])) / images
    ours_100 = extraction_train_val + cached_100
    results["head"] = {
        "reference_seconds_per_epoch": reference_epoch,
        "reference_100_epochs_s": 100 * reference_epoch,
        "cached_100_epochs_s": cached_100, "feature_extraction_s": extraction_train_val,
        "ours_100_epochs_total_s": ours_100, "speedup": 100 * reference_epoch / ours_100}
    shutil.rmtree(out)


def bench_memory(args, root: Path, results: dict) -> None:
    rows = {}
    for factor in (1, 4):
        per_class = args.memory_per_class * factor
        params = tiny_params(args, per_class)
        repo, env = make_project(root / f"memory{factor}", params)
        subprocess.run(stage_command(repo, "download"), cwd=repo, env=env, check=True,
                       capture_output=True)
        # Peak RSS varies by several % from run to run (thread timing): medians of repeats.
        trim = statistics.median(peak_rss_mb(stage_command(repo, "trim"), repo, env)
                                 for _ in range(args.repeats))
        subprocess.run(stage_command(repo, "split"), cwd=repo, env=env, check=True,
                       capture_output=True)
        features = statistics.median(peak_rss_mb(stage_command(repo, "features"), repo, env)
                                     for _ in range(args.repeats))
        rows[factor] = {"images": per_class * args.classes * 2, "trim_mb": trim,
                        "features_mb": features}
    results["memory"] = {
        "N": rows[1], "4N": rows[4],
        "trim_ratio": rows[4]["trim_mb"] / rows[1]["trim_mb"],
        "features_ratio": rows[4]["features_mb"] / rows[1]["features_mb"]}


def tiny_params(args, per_class: int) -> dict:
    from foodtransfer.config import DEFAULT_CLASSES

    return {
        "image_size": args.image_size, "backbone": args.backbone, "weights": "none",
        "epochs": 100, "patience": 100, "batch_size": 32,
        "data": {"source": "sample", "classes": list(DEFAULT_CLASSES[:args.classes]),
                 "samples_per_class": per_class, "test_per_class": max(2, per_class // 4),
                 "sample": {"train_per_class": per_class + 3,
                            "test_per_class": max(2, per_class // 4),
                            "min_side": 200, "max_side": 400}},
        "baseline": {"epochs": 1, "image_size": 64},
        "finetune": {"epochs": args.finetune_epochs, "unfreeze": 30},
        "mlflow": {"experiment": "benchmark"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--memory-per-class", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="EfficientNetV2B0")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="12345",
                        help="which rows to run (e.g. 12); the others keep their figures "
                             "from the last run in bench/results/benchmark.json")
    args = parser.parse_args()
    results: dict = {"args": vars(args), "cpus": os.cpu_count()}
    root = Path(tempfile.mkdtemp(prefix="foodtransfer-bench-"))
    try:
        # 3 and 5: the real pipeline through DVC.
        repo, env = make_project(root / "pipeline", tiny_params(args, args.per_class))
        if "3" not in args.rows and "5" not in args.rows:
            subprocess.run(["dvc", "repro", "split"], cwd=repo, env=env, capture_output=True,
                           check=True)
        else:
            started = time.perf_counter()
            full = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True,
                                  text=True, check=True)
            full_seconds = time.perf_counter() - started
            subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
            subprocess.run(["git", "commit", "-qm", "run"], cwd=repo, env=env, check=True)
            started = time.perf_counter()
            experiment = subprocess.run(["dvc", "exp", "run", "-S", "dropout=0.5"], cwd=repo,
                                        env=env, capture_output=True, text=True, check=True)
            experiment_seconds = time.perf_counter() - started
            stages = stage_seconds(experiment.stdout)
            results["iteration"] = {
                "full_repro_s": full_seconds, "exp_run_s": experiment_seconds,
                "ratio": experiment_seconds / full_seconds,
                "full_stage_s": stage_seconds(full.stdout), "exp_stage_s": stages,
                "exp_non_finetune_share_of_full": (experiment_seconds - stages.get("finetune", 0))
                / full_seconds,
                # what DVC itself takes in the exp run (workspace, hashing, commit), not a stage
                "exp_dvc_overhead_s": experiment_seconds - sum(stages.values())}
            cached = json.loads((repo / "metrics/finetune.json").read_text())
            subprocess.run(["dvc", "exp", "run", "-S", "finetune.cache_frozen=false"], cwd=repo,
                           env=env, capture_output=True, text=True, check=True)
            uncached = json.loads((repo / "metrics/finetune.json").read_text())
            results["finetune"] = {
                "cached_seconds_per_epoch": cached["seconds_per_epoch"],
                "bottom_cache_seconds": cached.get("bottom_cache_seconds", 0.0),
                "full_seconds_per_epoch": uncached["seconds_per_epoch"],
                "speedup_per_epoch": uncached["seconds_per_epoch"] / cached["seconds_per_epoch"],
                "test_accuracy_cached": cached["test_accuracy"],
                "test_accuracy_full": uncached["test_accuracy"]}
        # 1 and 2 on the same trimmed images, in this process.
        sys.path.insert(0, str(PROJECT / "src"))
        if "1" in args.rows or "2" in args.rows:
            bench_head_and_features(args, repo, results)
        if "4" in args.rows:
            bench_memory(args, root, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = PROJECT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "benchmark.json"
    if args.rows != "12345" and previous.exists():
        results = {**json.loads(previous.read_text()), **results}
    previous.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(r: dict) -> None:
    h, f, i, m, t = r["head"], r["features"], r["iteration"], r["memory"], r["finetune"]
    rows = [
        ("1 head training, 100 epochs",
         f"reference {h['reference_100_epochs_s']:.0f} s ({h['reference_seconds_per_epoch']:.1f} s/epoch)",
         f"cached {h['ours_100_epochs_total_s']:.1f} s (extraction {h['feature_extraction_s']:.1f} s + heads {h['cached_100_epochs_s']:.1f} s)",
         f"{h['speedup']:.0f}x faster (target >= 50x)"),
        ("2 feature extraction",
         f"in memory: model.predict {f['raw_predict_images_per_s']:.1f} img/s, "
         f"compiled forward {f['raw_forward_images_per_s']:.1f} img/s",
         f"features path {f['pipeline_images_per_s']:.1f} img/s",
         f"{f['ratio_of_limit']:.2f} of the limit (target >= 0.85)"),
        ("3 iteration latency",
         f"dvc repro {i['full_repro_s']:.0f} s",
         f"exp run -S dropout=0.5 {i['exp_run_s']:.0f} s",
         f"{i['ratio']:.2f} of the full run; all but fine-tune "
         f"{i['exp_non_finetune_share_of_full']:.1%} (target <= 5%)"),
        ("4 peak RSS, N vs 4N images",
         f"trim {m['N']['trim_mb']:.0f}/{m['4N']['trim_mb']:.0f} MiB",
         f"features {m['N']['features_mb']:.0f}/{m['4N']['features_mb']:.0f} MiB",
         f"ratios {m['trim_ratio']:.2f} / {m['features_ratio']:.2f} (target <= 1.10)"),
        ("5 fine-tune epoch",
         f"full backbone {t['full_seconds_per_epoch']:.1f} s/epoch",
         f"cached bottom {t['cached_seconds_per_epoch']:.1f} s/epoch (+{t['bottom_cache_seconds']:.1f} s once)",
         f"{t['speedup_per_epoch']:.1f}x faster per epoch"),
    ]
    print(f"\nbenchmark on {r['cpus']} CPUs, {r['args']}")
    for row in rows:
        print(" | ".join(row))
    print("\nstage seconds, full repro:", r["iteration"]["full_stage_s"])
    print("stage seconds, exp run:   ", r["iteration"]["exp_stage_s"],
          f"+ DVC itself {r['iteration']['exp_dvc_overhead_s']:.1f} s")
    print(f"features: one-time trace {f['trace_seconds']:.1f} s (not in row 2's rates)")


if __name__ == "__main__":
    main()
