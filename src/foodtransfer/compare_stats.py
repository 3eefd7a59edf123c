"""The numbers ``foodtransfer compare`` gives per configuration and variant: mean ± sd over
seeds, the image-only and the seeds + images intervals, the sources of the uncertainty, and
each configuration's difference from a reference (the statistics are in
:mod:`foodtransfer.uncertainty`); the table and the MLflow metrics they make."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from foodtransfer import variants
from foodtransfer.evaluation import right_per_image
from foodtransfer.uncertainty import (MIN_SEEDS, ConfigurationDifference, configuration_difference,
                                      holm_adjusted, image_bootstrap_sd, mean_and_sd,
                                      pooled_interval, seed_image_interval)

if TYPE_CHECKING:
    from foodtransfer.compare import Group

VARIANTS = variants.NAMES
METRICS = ("test_accuracy", "test_macro_f1", "best_val_accuracy")


def correctness(client, run_id: str, cache: Path) -> pd.Series:
    """Per test image, whether the variant run got it right (from its logged predictions)."""
    path = client.download_artifacts(run_id, "dvc_plots/predictions.csv", str(cache))
    return right_per_image(pd.read_csv(path))


@dataclass
class Summary:
    """One variant in one group: mean ± sd over seeds, the image-only interval (``pooled``:
    the seeds held fixed, test images resampled) and the seed-and-image interval (``both``:
    a two-level bootstrap, None under MIN_SEEDS seeds)."""

    group: Group
    variant: str
    seeds: list[str]
    values: dict[str, list[float]]
    pooled: tuple[float, float] | None
    both: tuple[float, float] | None = None
    image_sd: float | None = None
    correct: pd.DataFrame | None = None  # seeds x test images (columns: image ids, sorted)

    def mean_sd(self, metric: str) -> tuple[float, float]:
        values = self.values.get(metric) or [math.nan]
        return mean_and_sd(values)

    def mean_sd_text(self, metric: str) -> str:
        """``0.853 ± 0.012`` (the mean alone for one seed)."""
        mean, sd = self.mean_sd(metric)
        return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"

    def narrower_by(self) -> str | None:
        """Which more data narrows the interval most: "seeds" when the seeds' spread of the
        accuracy exceeds the test images' share, else "test images" (None: not known)."""
        seed_sd = self.mean_sd("test_accuracy")[1]
        if self.image_sd is None or math.isnan(seed_sd) or len(self.seeds) < MIN_SEEDS:
            return None
        # The mean over k seeds varies by seed_sd / sqrt(k) from the seeds alone.
        return "seeds" if seed_sd / math.sqrt(len(self.seeds)) > self.image_sd else "test images"


@dataclass
class Difference:
    """One variant: a configuration's accuracy minus the reference configuration's."""

    variant: str
    group: Group
    reference: Group
    result: ConfigurationDifference
    holm_p: float = math.nan


def summarise(client, groups: list[Group], cache: Path) -> list[Summary]:
    summaries = []
    for entry in groups:
        for variant in VARIANTS:
            runs = [e for e in entry.executions if f"{variant}_test_accuracy" in e.metrics]
            if not runs:
                continue
            values = {metric: [e.metrics[f"{variant}_{metric}"] for e in runs
                               if f"{variant}_{metric}" in e.metrics] for metric in METRICS}
            rows = [correctness(client, e.variant_runs[variant], cache / e.run_id / variant)
                    for e in runs if variant in e.variant_runs]
            summary = Summary(entry, variant, [e.seed for e in runs], values, None)
            if rows and all(set(row.index) == set(rows[0].index) for row in rows):
                order = sorted(rows[0].index)
                correct = pd.DataFrame([row.loc[order].to_numpy() for row in rows],
                                       columns=order)
                matrix = correct.to_numpy(dtype=bool)
                summary.pooled = pooled_interval(matrix)
                summary.both = seed_image_interval(matrix)
                summary.image_sd = image_bootstrap_sd(matrix)
                summary.correct = correct
            summaries.append(summary)
    return summaries


def differences(summaries: list[Summary], groups: list[Group], reference: Group
                ) -> list[Difference]:
    """Each other configuration against ``reference``, per variant, on the test images both
    share (two-level bootstrap; Holm-adjusted across all the comparisons); only where both
    have at least MIN_SEEDS seeds."""
    found = []
    by_key = {(s.group.key, s.variant): s for s in summaries}
    for entry in groups:
        if entry is reference:
            continue
        for variant in VARIANTS:
            mine, theirs = by_key.get((entry.key, variant)), by_key.get((reference.key, variant))
            if mine is None or theirs is None or mine.correct is None or theirs.correct is None:
                continue
            if min(len(mine.correct), len(theirs.correct)) < MIN_SEEDS:
                continue  # one seed's luck is not a configuration's difference
            if list(mine.correct.columns) != list(theirs.correct.columns):
                continue  # other test images: not paired
            found.append(Difference(variant, entry, reference, configuration_difference(
                mine.correct.to_numpy(dtype=bool), theirs.correct.to_numpy(dtype=bool))))
    for difference, adjusted in zip(found, holm_adjusted([d.result.p_value for d in found])):
        difference.holm_p = adjusted
    return found


# -------------------------------------------------------------------------------- output
def experiments_frame(summaries: list[Summary], swept: list[str]) -> pd.DataFrame:
    rows = []
    for summary in summaries:
        values = dict(summary.group.key)
        row: dict[str, Any] = {name: values.get(name) for name in swept}
        row.update(variant=summary.variant, seeds=len(summary.seeds))
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_sd"] = summary.mean_sd(metric)
        row["test_accuracy_pooled_ci_low"] = summary.pooled[0] if summary.pooled else None
        row["test_accuracy_pooled_ci_high"] = summary.pooled[1] if summary.pooled else None
        row["test_accuracy_seed_image_ci_low"] = summary.both[0] if summary.both else None
        row["test_accuracy_seed_image_ci_high"] = summary.both[1] if summary.both else None
        row["test_accuracy_image_sd"] = summary.image_sd
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_metrics(frame: pd.DataFrame, swept: list[str]) -> dict[str, float]:
    metrics = {}
    for _, row in frame.iterrows():
        label = "_".join(f"{name}_{row[name]}" for name in swept) or "all"
        for column in ("test_accuracy_mean", "test_accuracy_sd", "test_accuracy_pooled_ci_low",
                       "test_accuracy_pooled_ci_high", "test_accuracy_seed_image_ci_low",
                       "test_accuracy_seed_image_ci_high", "test_accuracy_image_sd",
                       "best_val_accuracy_mean"):
            value = row[column]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                metrics[f"{label}/{row['variant']}/{column}"[:250]] = float(value)
    return metrics


def difference_metrics(found: list[Difference], swept: list[str]) -> dict[str, float]:
    metrics = {}
    for difference in found:
        label = "_".join(f"{name}_{dict(difference.group.key).get(name)}" for name in swept)
        result = difference.result
        for name, value in (("diff", result.difference), ("diff_ci_low", result.ci_low),
                            ("diff_ci_high", result.ci_high), ("diff_p", result.p_value),
                            ("diff_p_holm", difference.holm_p)):
            metrics[f"{label}/{difference.variant}/test_accuracy_{name}"[:250]] = float(value)
    return metrics
