"""Stage ``report``: compare the four variants of one pipeline execution and publish the best.

It reads what the variant stages wrote (``metrics/<variant>.json``,
``plots/<variant>/{history,predictions}.csv``, ``artifacts/<variant>/{classes,mlflow_run}.json``,
all named on its command line) and writes ``reports/``: ``comparison.md`` (the table, data version, changed params, MLflow run
ids), ``curves.png`` (every variant's train and validation curves on shared axes),
``confusion.png`` (best transfer variant and fine-tuned model) and ``errors.png`` (the
champion's most confident test mistakes). In MLflow it opens a parent run ``pipeline`` that
holds these files and nests the variant runs of this execution, and registers the champion
(best by validation accuracy, never test) under ``mlflow.registered_model`` with the alias
``champion``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from foodtransfer import plots, variants
from foodtransfer.atomic import scratch_dir
from foodtransfer.config import Params, flatten
from foodtransfer.data.manifests import data_version
from foodtransfer.errors import DataError
from foodtransfer.evaluation import right_per_image
from foodtransfer.markdown import Pair, ReportContext, comparison_markdown, number
from foodtransfer.tracking.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS
from foodtransfer.uncertainty import PairedDifference, paired_difference

VARIANTS = variants.NAMES  # in pipeline order: the paired tests compare later with earlier
TRANSFER_VARIANTS = tuple(v.name for v in variants.VARIANTS if v.frozen_backbone)
# run.json: the pipeline run and registered version of this report (the sweep reads it).
RUN_FILE = "run.json"
REPORT_FILES = ("comparison.md", "curves.png", "confusion.png", "errors.png", RUN_FILE)
# Per-variant metrics the pipeline run repeats, with their intervals (prefixes of the keys).
SUMMARY_METRICS = ("test_accuracy", "test_top5_accuracy", "test_macro_f1", "best_val_accuracy")
ERROR_GRID = 16  # most confident mistakes shown in errors.png


@dataclass(frozen=True)
class VariantSource:
    """Where one variant stage's outputs are (from the command line)."""

    metrics: Path  # metrics/<variant>.json: the variant is named by the file
    plots: Path  # plots/<variant>/ with history.csv and predictions.csv
    artifacts: Path  # artifacts/<variant>/ with classes.json and mlflow_run.json

    @property
    def name(self) -> str:
        return self.metrics.stem


@dataclass
class VariantResult:
    """What one variant stage left behind."""

    name: str
    metrics: dict[str, Any]
    history: pd.DataFrame
    predictions: pd.DataFrame  # test: image_id, actual, predicted, probability
    class_names: list[str]
    run_id: str
    val_predictions: pd.DataFrame | None = None  # the same on validation


def _require(path: Path, variant: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro {variant}' first.")
    return path


def load_results(sources: list[VariantSource]) -> dict[str, VariantResult]:
    """Every variant's metrics, curves, test predictions, class names and MLflow run id."""
    if not sources:
        raise DataError("no variants to compare: give each variant's --metrics, --plots and "
                        "--artifacts (see the report stage's cmd in dvc.yaml).")
    results = {}
    for source in sources:
        variant = variants.get(source.name).name  # only registered variants are compared
        metrics_path = source.metrics
        run_path = source.artifacts / "mlflow_run.json"
        try:
            metrics = json.loads(_require(metrics_path, variant).read_text())
            run_id = json.loads(_require(run_path, variant).read_text())["run_id"]
            class_names = json.loads(
                _require(source.artifacts / "classes.json", variant).read_text())
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{metrics_path} or {run_path} is not what the {variant} stage "
                            f"writes ({error}): run 'dvc repro --force {variant}'.") from error
        missing = [key for key in ("best_val_accuracy", "test_accuracy") if key not in metrics]
        if missing:
            raise DataError(f"{metrics_path} lacks {', '.join(missing)}: run "
                            f"'dvc repro --force {variant}'.")
        history = pd.read_csv(_require(source.plots / "history.csv", variant))
        predictions = pd.read_csv(_require(source.plots / "predictions.csv", variant))
        val_path = source.artifacts / "val_predictions.csv"
        val_predictions = pd.read_csv(val_path) if val_path.is_file() else None
        results[variant] = VariantResult(variant, metrics, history, predictions, class_names,
                                         run_id, val_predictions)
    first_name = sources[0].name
    first = results[first_name].class_names
    for result in results.values():
        if result.class_names != first:
            raise DataError(
                f"the variants were trained on different classes ({first_name}: {first}, "
                f"{result.name}: {result.class_names}): run 'dvc repro' to bring them in line.")
    return results


def _selection_key(result: VariantResult) -> tuple[float, float]:
    """Higher validation accuracy wins; lower validation loss breaks ties. Test metrics are
    never looked at: the test set stays held out."""
    loss = result.metrics.get("best_val_loss", math.inf)
    return (float(result.metrics["best_val_accuracy"]), -float(loss))


def choose_best(results: dict[str, VariantResult], among: tuple[str, ...] = VARIANTS) -> str:
    """The variant with the best validation score (the first in ``among`` on a full tie)."""
    candidates = [name for name in among if name in results]
    if not candidates:
        raise DataError(f"no results for any of {', '.join(among)}")
    return max(candidates, key=lambda name: (_selection_key(results[name]),
                                             -candidates.index(name)))


def changed_params(params: Params) -> dict[str, tuple[Any, Any]]:
    """``{key: (value, default)}`` for every param that differs from its default."""
    defaults = flatten(Params())
    return {key: (value, defaults.get(key)) for key, value in flatten(params).items()
            if value != defaults.get(key)}


# ------------------------------------------------------------------------- paired tests
def _paired(a: pd.DataFrame | None, b: pd.DataFrame | None, what: str
            ) -> PairedDifference | None:
    if a is None or b is None:
        return None
    right_a, right_b = right_per_image(a), right_per_image(b)
    if set(right_a.index) != set(right_b.index):
        raise DataError(f"the variants' {what} predictions are not on the same images: run "
                        "'dvc repro' to bring them in line.")
    return paired_difference(right_a.to_numpy(), right_b.loc[right_a.index].to_numpy())


def compare_pair(results: dict[str, VariantResult], a: str, b: str) -> Pair:
    """Variant ``a`` against ``b`` on the same test and validation images."""
    return Pair(a, b, _paired(results[a].predictions, results[b].predictions, "test"),
                _paired(results[a].val_predictions, results[b].val_predictions, "validation"))


def paired_tests(results: dict[str, VariantResult]) -> list[Pair]:
    """Every later variant against every earlier one, in pipeline order (transfer vs
    baseline, dropout vs transfer, finetune vs dropout, ...)."""
    names = list(results)
    pairs = []
    for gap in range(1, len(names)):  # neighbours first: what each step adds
        for first in range(len(names) - gap):
            pairs.append(compare_pair(results, names[first + gap], names[first]))
    return pairs


def runner_up(results: dict[str, VariantResult], champion: str) -> str | None:
    others = tuple(name for name in VARIANTS if name in results and name != champion)
    return choose_best(results, others) if others else None


def pair_metrics(pairs: list[Pair]) -> dict[str, float]:
    """The paired tests as MLflow metrics of the pipeline run."""
    metrics = {}
    for pair in pairs:
        for where, diff in (("test", pair.test), ("val", pair.validation)):
            if diff is None:
                continue
            prefix = f"{pair.a}_vs_{pair.b}_{where}"
            metrics.update({f"{prefix}_difference": diff.difference,
                            f"{prefix}_ci_low": diff.ci_low, f"{prefix}_ci_high": diff.ci_high,
                            f"{prefix}_mcnemar_p": diff.p_value})
    return metrics


# ------------------------------------------------------------------------------- figures
def _continue_from(start: VariantResult | None, history: pd.DataFrame) -> pd.DataFrame:
    """The history of a variant that continues ``start``'s trained model (the fine-tune from
    the dropout model), led by the point it starts from: ``start`` at its best (restored)
    epoch, placed just before its first epoch, so that its curve visibly continues."""
    if start is None or start.history.empty or history.empty:
        return history
    best = start.history[start.history["epoch"] == start.metrics.get("best_epoch")]
    point = (best if not best.empty else start.history.tail(1)).copy()
    point["epoch"] = float(history["epoch"].min()) - 1
    return pd.concat([point, history], ignore_index=True)


def plot_curves(results: dict[str, VariantResult], path: Path) -> None:
    """Every variant's curves on shared axes; a variant that continues another's model
    continues its curve's epochs."""
    histories, start = {}, None
    for name, result in results.items():
        origin = variants.get(name).starts_from
        histories[name] = (_continue_from(results.get(origin), result.history) if origin
                           else result.history)
        if origin and start is None and not result.history.empty:
            start = float(result.history["epoch"].min()) - 0.5
    plots.all_curves(histories, {name: result.metrics.get("best_epoch")
                                 for name, result in results.items()}, path, start,
                     colors=variants.COLORS)


def confusion_counts(predictions: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(predictions["actual"].astype(str),
                            predictions["predicted"].astype(str), labels=class_names)


def most_confident_mistakes(predictions: pd.DataFrame, count: int = ERROR_GRID) -> pd.DataFrame:
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    return wrong.sort_values("probability", ascending=False, kind="stable").head(count)


def plot_errors(result: VariantResult, trimmed: Path, split: Path, path: Path,
                count: int = ERROR_GRID) -> int:
    """A grid of ``result``'s most confident test mistakes (image, true and predicted class,
    probability); returns how many it shows."""
    from foodtransfer.data.images import ImageStore

    mistakes = most_confident_mistakes(result.predictions, count)
    manifest_path = split / "test.csv"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} is missing: run 'dvc repro split' first.")
    manifest = pd.read_csv(manifest_path).drop_duplicates("image_id").set_index("image_id")
    unknown = sorted(set(mistakes["image_id"]) - set(manifest.index))
    if unknown:
        raise DataError(f"{result.name}'s predictions name test images that {manifest_path} "
                        f"does not list ({unknown[:3]}): run 'dvc repro'.")
    stores: dict[str, ImageStore] = {}
    images, captions = [], []
    for _, row in mistakes.iterrows():
        entry = manifest.loc[row["image_id"]]
        store_name = str(entry["store"])
        if store_name not in stores:
            stores[store_name] = ImageStore(trimmed / f"{store_name}.npy")
        images.append(stores[store_name].read([int(entry["index"])])[0])
        captions.append(f"true: {row['actual']}\npredicted: {row['predicted']} "
                        f"({float(row['probability']):.2f})")
    plots.image_grid(images, captions, f"{result.name}: most confident test mistakes", path,
                     empty_text="no mistakes on the test set")
    return len(mistakes)


def write_figures(results: dict[str, VariantResult], champion: str, trimmed: Path,
                  split: Path, out: Path) -> None:
    plot_curves(results, out / "curves.png")
    confusion_variants = [choose_best(results, TRANSFER_VARIANTS)] if any(
        name in results for name in TRANSFER_VARIANTS) else []
    confusion_variants += [name for name in results if variants.get(name).starts_from]
    class_names = results[champion].class_names
    plots.confusion_figure(
        [(confusion_counts(results[name].predictions, class_names),
          f"{name} (test accuracy {number(results[name].metrics.get('test_accuracy'))})")
         for name in confusion_variants or [champion]],
        class_names, out / "confusion.png", title="Test confusion matrices")
    plot_errors(results[champion], trimmed, split, out / "errors.png")


# --------------------------------------------------------------------------------- stage
def _model_description(results: dict[str, VariantResult]) -> str:
    classes = next(iter(results.values())).class_names
    return ("Food-101 image classifier (foodtransfer). Input: raw RGB images, float32 "
            "(n, image_size, image_size, 3), pixels 0..255; preprocessing is inside the model. "
            f"Output: a DataFrame of probabilities over {len(classes)} classes, one column per "
            f"class name. Each pipeline execution registers its winner (best by validation "
            "accuracy) in '<name>-candidates'; '@challenger' there is the latest experiment's. "
            "The production model '<name>' holds copies of promoted candidates; its "
            f"'@{CHAMPION_ALIAS}' is what predict and serve use (foodtransfer promote moves it; "
            "on the project's own store, so does dvc repro in the main workspace).")


def provenance(result: VariantResult, pipeline_run_id: str, version: str) -> dict[str, str]:
    """The tags of a registered version: where it comes from (variant, pipeline run, DVC
    experiment, git commit, data version) and how it scored (validation accuracy with its
    95 % interval, which chose it; test accuracy with its interval, reported only)."""
    from foodtransfer.tracking.runs import PIPELINE_TAG, git_commit
    from foodtransfer.tracking.store import project_root
    from foodtransfer.uncertainty import pooled_interval

    metrics = result.metrics
    tags = {"variant": result.name, "data_version": version, PIPELINE_TAG: pipeline_run_id,
            "best_val_accuracy": f"{metrics['best_val_accuracy']:.4f}",
            "val_accuracy": f"{metrics['best_val_accuracy']:.4f}",
            "test_accuracy": f"{metrics['test_accuracy']:.4f}",
            "class_names": json.dumps(result.class_names)[:5000]}
    if result.val_predictions is not None and len(result.val_predictions):
        low, high = pooled_interval(right_per_image(result.val_predictions).to_numpy()[None])
        tags["val_accuracy_ci"] = f"[{low:.4f}, {high:.4f}]"
    if "test_accuracy_ci_low" in metrics:
        tags["test_accuracy_ci"] = (f"[{metrics['test_accuracy_ci_low']:.4f}, "
                                    f"{metrics['test_accuracy_ci_high']:.4f}]")
    commit = git_commit(Path.cwd()) or git_commit(project_root())
    if commit:
        tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def publish(files: Path, out: Path) -> None:
    """Move the finished report files into ``out``, each by an atomic rename; other files
    there (``foodtransfer compare``'s) stay."""
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        os.replace(files / name, out / name)


def run(params: Params, trimmed: Path, split: Path, sources: list[VariantSource],
        out: Path) -> str:
    """Write the report files into ``out`` (reports/), log them to a parent MLflow run that
    groups this execution's variant runs, and register the champion. Returns the stage's
    summary line."""
    from foodtransfer.tracking import runs as tracking_runs
    from foodtransfer.tracking.registry import (candidates_model, in_experiment,
                                                promotes_itself, register_version,
                                                settle_aliases)
    from foodtransfer.tracking.store import connect, project_root

    results = load_results(sources)
    experiment = in_experiment()
    champion = choose_best(results)
    second = runner_up(results, champion)
    pairs = paired_tests(results)
    against_runner_up = compare_pair(results, champion, second) if second else None
    version = data_version(split)
    changed = changed_params(params)
    config = params.mlflow
    connect(config.experiment)
    candidates = candidates_model(config.registered_model)
    # What the registry will do, for the report (settle_aliases does it, last, and re-checks
    # under the store's lock).
    promote = promotes_itself(config.registered_model, experiment)
    alias = CHAMPION_ALIAS if promote else CHALLENGER_ALIAS
    runs = tracking_runs.get_variant_runs(
        {name: result.run_id for name, result in results.items()})
    tags = {"data_version": version, "champion": champion,
            **({"runner_up": second} if second else {}),
            **{f"variant_run_id.{name}": result.run_id for name, result in results.items()}}
    # The order closes the windows a kill could leave open: the run ends FINISHED with
    # everything logged, then the files land (DVC records the stage only after the command
    # exits, so a kill before this point re-runs it), then the alias moves, last, onto a
    # version whose run and report are complete.
    with scratch_dir(out) as tmp:
        with tracking_runs.tracked_run(config.experiment, tracking_runs.PIPELINE_RUN_NAME,
                                       "pipeline", flatten(params), tags,
                                       stages=list(results)) as parent:
            # Figures first: a failure there registers nothing.
            write_figures(results, champion, trimmed, split, tmp)
            champion_run = runs[champion]
            registered_version = register_version(
                champion_run.data.tags["model_uri"], candidates,
                provenance(results[champion], parent.run_id, version),
                description=_model_description(results))
            adopted = tracking_runs.adopt_runs(parent.run_id, runs)
            owners = {name: (parent.run_id if name in adopted
                             else runs[name].data.tags.get(tracking_runs.PIPELINE_TAG, ""))
                      for name in results}
            context = ReportContext(
                experiment=config.experiment, data_version=version,
                parent_run_id=parent.run_id,
                git_commit=(tracking_runs.git_commit(Path.cwd())
                            or tracking_runs.git_commit(project_root())),
                dvc_exp_name=os.environ.get("DVC_EXP_NAME"),
                registered_model=candidates, production_model=config.registered_model,
                registered_version=registered_version, registered_alias=alias,
                run_owner=owners, keep_epoch=params.keep_epoch)
            markdown = comparison_markdown(results, champion, changed, context, pairs,
                                           against_runner_up)
            (tmp / "comparison.md").write_text(markdown)
            (tmp / RUN_FILE).write_text(json.dumps(
                {"pipeline_run_id": parent.run_id, "registered_model": candidates,
                 "registered_version": registered_version, "alias": alias}, indent=1) + "\n")
            for name in REPORT_FILES:
                parent.log_artifact(tmp / name)
            parent.log_metrics({
                **{f"{name}_{key}": value for name, result in results.items()
                   for key, value in result.metrics.items()
                   if key.startswith(SUMMARY_METRICS)},
                **pair_metrics(pairs + ([against_runner_up] if against_runner_up else []))})
            # MLflow's UI shows this tag as the run's description (rendered markdown).
            parent.set_tags({tracking_runs.NOTE_TAG: markdown[:7900],
                             "registered_model_version": registered_version,
                             "registered_model_alias": alias})
        publish(tmp, out)
        tracking_runs.mark_published(parent.run_id)
        moved = settle_aliases(config.registered_model, registered_version, experiment)
        reused = [name for name in results if name not in adopted]
    actual = CHAMPION_ALIAS if any(m.endswith("@" + CHAMPION_ALIAS) for m in moved) \
        else CHALLENGER_ALIAS
    mismatch = ""
    if actual != alias:  # another execution promoted first (checked again under the lock)
        import mlflow

        from foodtransfer.atomic import write_text
        from foodtransfer.tracking.store import retry_on_lock

        retry_on_lock(mlflow.MlflowClient().set_tag)(parent.run_id, "registered_model_alias",
                                                     actual)
        ran = json.loads((out / RUN_FILE).read_text())
        write_text(out / RUN_FILE, json.dumps({**ran, "alias": actual}, indent=1) + "\n")
        mismatch = (f" (comparison.md expected @{alias}; checked again under the store's "
                    f"lock, the registry made it @{actual})")
    best = results[champion].metrics
    return (f"champion {champion} (validation accuracy {best['best_val_accuracy']:.3f}, test "
            f"{best['test_accuracy']:.3f}) -> {candidates} v{registered_version}"
            f"{'; ' + ', '.join(moved) if moved else ''}{mismatch}; pipeline run "
            f"{parent.run_id} groups "
            f"{', '.join(adopted) or 'no new runs'}"
            + (f" (reused: {', '.join(reused)})" if reused else "")
            + f"; report in {out}/")
