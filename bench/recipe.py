"""What the new recipe costs against the reference recipe, side by side in one run: every stage
script of `dvc repro` after the download (trim, split, features, transfer, dropout, finetune)
of each recipe, alternating, on a project whose download has run (its data/raw). The baseline
and the report are left out: the CNN from scratch is the same for both recipes and dominates
on a CPU, the report is seconds.

    python bench/recipe.py --project ../mini8 --repeats 3 --reference-image-size 224 \
        --reference-code ef090eb

The reference recipe is the new one (the project's params.yaml) with the recipe keys set back
(REFERENCE below) and, with --reference-image-size, another decoded size: 224 gives the
backbone the same 224 px as the recipe's 0.875 crop of 256 px images. With --reference-code,
the reference runs the stage scripts of that commit of the project's repository (a git
worktree in the scratch folder: "today's" pipeline, e.g. ef090eb, the last commit before the
recipe work), its params being the reference's keys that commit's params.yaml knows; without
it, both recipes run the project's code.

Each stage runs as DVC runs it (its cmd from dvc.yaml, its own process), with its outputs and
MLflow store in a scratch folder, so the project is not touched. Printed: per stage the median
wall time of each recipe and the ratio, the fine-tune seconds per epoch (from its metrics
file), and their total. Figures go to bench/results/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("trim", "split", "features", "transfer", "dropout", "finetune")
# The reference recipe (the params' defaults before the recipe work): what -S gives it back.
REFERENCE = {"features": {"crop": 1.0, "views": 0, "tta": False},
             "finetune": {"views": 0, "lr_schedule": "plateau", "lr_scale": 0.1,
                          "unfreeze": 30, "label_smoothing": 0.0},
             "dropout": 0.6}


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def known_keys(params: dict, schema: dict) -> dict:
    """``params`` without the keys ``schema`` (an older params.yaml) does not have, and with
    the older value where the two values differ in type (a key whose meaning changed since,
    e.g. mixed_precision: auto, then true | false)."""
    result = {}
    for key, value in params.items():
        if key not in schema:
            continue
        old = schema[key]
        if isinstance(value, dict) and isinstance(old, dict):
            result[key] = known_keys(value, old)
        elif old is None or value is None or type(value) is type(old) or \
                {type(value), type(old)} <= {int, float}:
            result[key] = value
        else:
            result[key] = old
    return result


def commands(code: Path, project: Path, scratch: Path) -> dict[str, list[str]]:
    """Each stage's cmd from ``code``'s dvc.yaml, its outputs moved under ``scratch``
    (inputs that are outputs of these stages too, so the chain stays inside it), the
    downloaded archive read from ``project``."""
    spec = yaml.safe_load((code / "dvc.yaml").read_text())["stages"]
    moved = ("data/trimmed", "data/split", "data/features", "data/bottom", "metrics/", "plots/",
             "artifacts/", "models/")
    result = {}
    for stage in STAGES:
        words = shlex.split(spec[stage]["cmd"])
        words = [str(scratch / word) if word.startswith(moved) else
                 str(project / word) if word.startswith("data/raw") else word
                 for word in words]
        result[stage] = [sys.executable, *words[1:]]
    return result


def run_all(args, project: Path, code: dict[str, Path], recipes: dict[str, dict],
            times: dict[str, dict[str, list[float]]], epochs: dict[str, list[float]],
            root: Path) -> None:
    """Every stage of each recipe, alternating, ``args.repeats`` times."""
    for repeat in range(args.repeats):
        for name, params in recipes.items():
            scratch = root / f"{name}-{repeat}"
            scratch.mkdir()
            (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                   "FOODTRANSFER_PROGRESS": "0",
                   "PYTHONPATH": os.pathsep.join(
                       [str(code[name] / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
            for stage, command in commands(code[name], project, scratch).items():
                command = [*command, "--params", str(scratch / "params.yaml")]
                started = time.perf_counter()
                result = subprocess.run(command, cwd=code[name], env=env,
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{stage} ({name}) failed:\n{result.stderr[-3000:]}")
                times[name][stage].append(time.perf_counter() - started)
            metrics = json.loads((scratch / "metrics" / "finetune.json").read_text())
            epochs[name].append(metrics["seconds_per_epoch"])
            print(f"repeat {repeat + 1}, {name}: " + ", ".join(
                f"{stage} {times[name][stage][-1]:.0f} s" for stage in STAGES), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-image-size", type=int, default=None)
    parser.add_argument("--reference-code", default=None,
                        help="a commit of the project: the reference runs its code")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" /
                        "recipe.json")
    args = parser.parse_args()
    project = args.project.resolve()
    base = yaml.safe_load((project / "params.yaml").read_text())
    reference = merge(base, REFERENCE)
    if args.reference_image_size:
        reference["image_size"] = args.reference_image_size
    recipes = {"reference": reference, "new": base}
    code = {"reference": project, "new": project}
    times: dict[str, dict[str, list[float]]] = {name: {stage: [] for stage in STAGES}
                                               for name in recipes}
    epochs: dict[str, list[float]] = {name: [] for name in recipes}
    with tempfile.TemporaryDirectory() as root:
        if args.reference_code:
            code["reference"] = Path(root) / "reference-code"
            subprocess.run(["git", "-C", str(project), "worktree", "add", "--detach",
                            str(code["reference"]), args.reference_code], check=True,
                           capture_output=True)
            schema = yaml.safe_load((code["reference"] / "params.yaml").read_text())
            recipes["reference"] = known_keys(reference, schema)
        try:
            run_all(args, project, code, recipes, times, epochs, Path(root))
        finally:
            if args.reference_code:
                subprocess.run(["git", "-C", str(project), "worktree", "remove", "--force",
                                str(code["reference"])], capture_output=True)
    medians = {name: {stage: statistics.median(values) for stage, values in stages.items()}
               for name, stages in times.items()}
    totals = {name: sum(values.values()) for name, values in medians.items()}
    result = {"repeats": args.repeats, "stage_seconds": times, "median_seconds": medians,
              "total_trim_to_finetune_s": totals, "recipes": recipes,
              "reference_code": args.reference_code or "this checkout",
              "finetune_seconds_per_epoch": {name: statistics.median(values)
                                             for name, values in epochs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| stage | reference recipe | new recipe | ratio |  (medians of {args.repeats})")
    print("| --- | ---: | ---: | ---: |")
    for stage in STAGES:
        ref, new = medians["reference"][stage], medians["new"][stage]
        print(f"| {stage} | {ref:.1f} s | {new:.1f} s | {new / ref:.2f} |")
    print(f"| **trim to finetune** | {totals['reference']:.0f} s | {totals['new']:.0f} s | "
          f"{totals['new'] / totals['reference']:.2f} |")
    per_epoch = result["finetune_seconds_per_epoch"]
    print(f"fine-tune epoch: {per_epoch['reference']:.2f} s -> {per_epoch['new']:.2f} s "
          f"({per_epoch['new'] / per_epoch['reference']:.2f}x)")


if __name__ == "__main__":
    main()
