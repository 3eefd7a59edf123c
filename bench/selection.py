"""The candidates' table for a recipe choice made on validation: per configuration of a results
spec whose configurations run up to the fine-tune (docs/results/selection.yaml), the dropout
head's and the fine-tune's validation and test accuracy over the spec's seeds, the epochs they
kept, and fine-tune − dropout on test per seed (paired on the test images, exact McNemar).

    foodtransfer results docs/results/selection.yaml --run    # the runs (DVC's queue)
    python bench/selection.py docs/results/selection.yaml     # this table, from the store

Run from the project the runs logged to (its MLflow store). The choice is made on the
validation columns; the test columns are reported after. Printed as markdown and written to
bench/results/selection.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    import mlflow

    from foodtransfer.compare import _all_runs
    from foodtransfer.evaluation import right_per_image
    from foodtransfer.resultspage import _matches, expected_params, load_spec
    from foodtransfer.tracking.store import connect_existing
    from foodtransfer.uncertainty import paired_difference

    spec = load_spec(args.spec)
    base = yaml.safe_load(args.params.read_text())
    experiment_id = connect_existing(spec.experiment)
    client = mlflow.MlflowClient()
    runs = _all_runs(client, experiment_id)
    finished = [r for r in runs if r.info.status == "FINISHED"
                and r.data.tags.get("outputs", "published") == "published"]

    def run_of(variant: str, expected: dict[str, str], seed: int, ignore: str | None):
        wanted = {k: v for k, v in expected.items() if not (ignore and k.startswith(ignore))}
        mine = [r for r in finished if r.data.tags.get("variant") == variant
                and r.data.tags.get("run_kind") == "variant"
                and r.data.params.get("seed") == str(seed) and _matches(r.data.params, wanted)]
        return max(mine, key=lambda r: r.info.start_time) if mine else None

    rows, missing = [], []
    with tempfile.TemporaryDirectory() as cache:
        def correct(run) -> pd.Series:
            path = client.download_artifacts(run.info.run_id, "dvc_plots/predictions.csv",
                                             f"{cache}/{run.info.run_id}")
            return right_per_image(pd.read_csv(path))

        for label, expected in expected_params(spec, base).items():
            cells: dict[str, list] = {key: [] for key in (
                "d_val", "d_test", "d_epoch", "f_val", "f_test", "f_epoch", "diff")}
            for seed in spec.seeds:
                # The dropout stage reads no finetune.* key: a dropout run another
                # configuration trained with the same head params is this one's too.
                dropout = run_of("dropout", expected, seed, ignore="finetune.")
                finetune = run_of("finetune", expected, seed, ignore=None)
                if dropout is None or finetune is None:
                    missing.append(f"{label} seed {seed}")
                    continue
                d, f = dropout.data.metrics, finetune.data.metrics
                cells["d_val"].append(d["best_val_accuracy"])
                cells["d_test"].append(d["test_accuracy"])
                cells["d_epoch"].append(f"{int(d['best_epoch'])}/{int(d['epochs_run'])}")
                cells["f_val"].append(f["best_val_accuracy"])
                cells["f_test"].append(f["test_accuracy"])
                cells["f_epoch"].append(
                    f"{int(f['best_epoch'] - f.get('first_epoch', 1) + 1)}/"
                    f"{int(f['epochs_run'])}")
                a, b = correct(finetune), correct(dropout)
                test = paired_difference(a.to_numpy(), b.loc[a.index].to_numpy())
                p = "< 0.001" if test.p_value < 0.001 else f"{test.p_value:.3f}"
                cells["diff"].append(f"{test.difference * 100:+.1f} (p {p})")
            rows.append([label, mean_sd(cells["d_val"]), mean_sd(cells["f_val"]),
                         mean_sd(cells["d_test"]), mean_sd(cells["f_test"]),
                         ", ".join(cells["d_epoch"]), ", ".join(cells["f_epoch"]),
                         "; ".join(cells["diff"])])
    header = ["configuration", "dropout val", "fine-tune val", "dropout test", "fine-tune test",
              "dropout kept epoch", "fine-tune kept epoch", "fine-tune − dropout, test, per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = (f"Seeds {', '.join(map(str, spec.seeds))}; mean ± sd; kept epoch per seed (of the "
            "epochs run); differences in points with the exact McNemar p.\n\n"
            + "\n".join(lines) + "\n")
    if missing:
        text += f"\nMissing runs: {'; '.join(missing)}\n"
    print(text)
    out = PROJECT / "bench" / "results" / "selection.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
