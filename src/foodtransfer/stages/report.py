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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from foodtransfer import plots
from foodtransfer.atomic import atomic_dir
from foodtransfer.config import Params, flatten
from foodtransfer.data.manifests import data_version
from foodtransfer.errors import DataError
from foodtransfer.tracking.registry import CHAMPION_ALIAS

VARIANTS = ("baseline", "transfer", "dropout", "finetune")
TRANSFER_VARIANTS = ("transfer", "dropout")  # heads on the frozen backbone
REPORT_FILES = ("comparison.md", "curves.png", "confusion.png", "errors.png")
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
    predictions: pd.DataFrame  # image_id, actual, predicted, probability
    class_names: list[str]
    run_id: str


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
        variant = source.name
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
        results[variant] = VariantResult(variant, metrics, history, predictions, class_names,
                                         run_id)
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


# ------------------------------------------------------------------------------ markdown
def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def _cell(value: Any, limit: int | None = None) -> str:
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class ReportContext:
    """Where the report's numbers come from, for its header."""

    experiment: str
    data_version: str
    parent_run_id: str | None = None
    git_commit: str | None = None
    dvc_exp_name: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    run_owner: dict[str, str] | None = None  # variant -> pipeline run that trained it


def comparison_markdown(results: dict[str, VariantResult], champion: str,
                        changed: dict[str, tuple[Any, Any]], context: ReportContext) -> str:
    lines = ["# Food-101 transfer learning: comparison of the variants", ""]
    facts = [f"data version `{context.data_version}`",
             f"MLflow experiment `{context.experiment}`"]
    if context.parent_run_id:
        facts.append(f"pipeline run `{context.parent_run_id}`")
    if context.dvc_exp_name:
        facts.append(f"DVC experiment `{context.dvc_exp_name}`")
    if context.git_commit:
        facts.append(f"git commit `{context.git_commit[:12]}`")
    lines += [" · ".join(facts), ""]
    best = results[champion].metrics
    champion_line = (f"**Champion: {champion}** (validation accuracy "
                     f"{best['best_val_accuracy']:.3f}; chosen on validation, never on test)")
    if context.registered_model:
        champion_line += (f", registered as `{context.registered_model}` version "
                          f"{context.registered_version} with the alias `{CHAMPION_ALIAS}`: "
                          f"`models:/{context.registered_model}@{CHAMPION_ALIAS}`")
    lines += [champion_line + ".", ""]
    header = ("variant", "test accuracy", "test top-5", "test macro F1", "validation accuracy",
              "epochs", "best epoch", "s / epoch", "trainable / total params", "MLflow run")
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 2) + [" --- "]) + "|"]
    for name, result in results.items():
        metrics = result.metrics
        run = f"`{result.run_id}`"
        owner = (context.run_owner or {}).get(name)
        if owner and owner != context.parent_run_id:
            run += f" (reused from pipeline run `{owner}`)"
        label = f"**{name}**" if name == champion else name
        lines.append("| " + " | ".join([
            label, _number(metrics.get("test_accuracy")),
            _number(metrics.get("test_top5_accuracy")), _number(metrics.get("test_macro_f1")),
            _number(metrics.get("best_val_accuracy")), _number(metrics.get("epochs_run")),
            _number(metrics.get("best_epoch")), _number(metrics.get("seconds_per_epoch"), 2),
            f"{_count(metrics.get('trainable_params'))} / {_count(metrics.get('total_params'))}",
            run]) + " |")
    chance = results.get("baseline") and results["baseline"].metrics.get(
        "untrained_test_accuracy")
    classes = results[champion].class_names
    lines += ["", f"{len(classes)} classes; chance level is about {1 / len(classes):.3f}"
              + (f" (the untrained baseline scores {chance:.3f} on test)." if chance is not None
                 else "."), ""]
    lines += ["## Params that differ from the defaults", ""]
    if changed:
        lines += ["| param | value | default |", "| --- | --- | --- |"]
        lines += [f"| `{key}` | {_cell(value)} | {_cell(default, 60)} |"
                  for key, (value, default) in sorted(changed.items())]
    else:
        lines.append("None: every param has its default value.")
    lines += ["", "## Figures", "",
              "Learning curves (train dashed, validation solid; stars mark the best epochs):", "",
              "![learning curves](curves.png)", "",
              "Test confusion matrices:", "", "![confusion matrices](confusion.png)", "",
              f"The champion's ({champion}) most confident test mistakes:", "",
              "![most confident mistakes](errors.png)", ""]
    return "\n".join(lines)



# ------------------------------------------------------------------------------- figures
def _continue_from(dropout: VariantResult | None, finetune: pd.DataFrame) -> pd.DataFrame:
    """The fine-tune history led by the point it starts from: the dropout model at its best
    (restored) epoch, placed just before the first fine-tune epoch, so its curve visibly
    continues the dropout curve."""
    if dropout is None or dropout.history.empty or finetune.empty:
        return finetune
    best = dropout.history[dropout.history["epoch"] == dropout.metrics.get("best_epoch")]
    start = (best if not best.empty else dropout.history.tail(1)).copy()
    start["epoch"] = float(finetune["epoch"].min()) - 1
    return pd.concat([start, finetune], ignore_index=True)


def plot_curves(results: dict[str, VariantResult], path: Path) -> None:
    """Every variant's curves on shared axes; the fine-tune curve continues the dropout
    curve's epochs."""
    histories = {name: (_continue_from(results.get("dropout"), result.history)
                        if name == "finetune" else result.history)
                 for name, result in results.items()}
    finetune = results.get("finetune")
    start = (float(finetune.history["epoch"].min()) - 0.5
             if finetune is not None and not finetune.history.empty else None)
    plots.all_curves(histories, {name: result.metrics.get("best_epoch")
                                 for name, result in results.items()}, path, start)


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
    if "finetune" in results:
        confusion_variants.append("finetune")
    class_names = results[champion].class_names
    plots.confusion_figure(
        [(confusion_counts(results[name].predictions, class_names),
          f"{name} (test accuracy {_number(results[name].metrics.get('test_accuracy'))})")
         for name in confusion_variants or [champion]],
        class_names, out / "confusion.png", title="Test confusion matrices")
    plot_errors(results[champion], trimmed, split, out / "errors.png")


# --------------------------------------------------------------------------------- stage
def _model_description(results: dict[str, VariantResult]) -> str:
    classes = next(iter(results.values())).class_names
    return ("Food-101 image classifier (foodtransfer). Input: raw RGB images, float32 "
            "(n, image_size, image_size, 3), pixels 0..255; preprocessing is inside the model. "
            f"Output: a DataFrame of probabilities over {len(classes)} classes, one column per "
            f"class name. The alias '{CHAMPION_ALIAS}' points at the best variant by validation "
            "accuracy of the latest pipeline run.")


def run(params: Params, trimmed: Path, split: Path, sources: list[VariantSource],
        out: Path) -> str:
    """Write ``out`` (reports/), log it to a parent MLflow run that groups this execution's
    variant runs, and register the champion. Returns the stage's summary line."""
    import os

    from foodtransfer.tracking import runs as tracking_runs
    from foodtransfer.tracking.registry import register_model_version
    from foodtransfer.tracking.store import connect, project_root

    results = load_results(sources)
    champion = choose_best(results)
    version = data_version(split)
    changed = changed_params(params)
    config = params.mlflow
    connect(config.experiment)
    runs = tracking_runs.get_variant_runs(
        {name: result.run_id for name, result in results.items()})
    tags = {"data_version": version, "champion": champion,
            **{f"variant_run_id.{name}": result.run_id for name, result in results.items()}}
    with tracking_runs.tracked_run(config.experiment, tracking_runs.PIPELINE_RUN_NAME,
                                   "pipeline", flatten(params), tags) as parent, \
            atomic_dir(out) as tmp:
        # Figures first: a failure there must not move the champion alias.
        write_figures(results, champion, trimmed, split, tmp)
        champion_run = runs[champion]
        registered_version = register_model_version(
            champion_run.data.tags["model_uri"], config.registered_model, CHAMPION_ALIAS,
            champion_run.info.run_id,
            tags={"variant": champion, "data_version": version,
                  tracking_runs.PIPELINE_TAG: parent.run_id,
                  "best_val_accuracy": f"{results[champion].metrics['best_val_accuracy']:.4f}",
                  "class_names": json.dumps(results[champion].class_names)[:5000]},
            description=_model_description(results))
        adopted = tracking_runs.adopt_runs(parent.run_id, runs)
        owners = {name: (parent.run_id if name in adopted
                         else runs[name].data.tags.get(tracking_runs.PIPELINE_TAG, ""))
                  for name in results}
        context = ReportContext(
            experiment=config.experiment, data_version=version, parent_run_id=parent.run_id,
            git_commit=tracking_runs.git_commit(project_root()),
            dvc_exp_name=os.environ.get("DVC_EXP_NAME"),
            registered_model=config.registered_model, registered_version=registered_version,
            run_owner=owners)
        markdown = comparison_markdown(results, champion, changed, context)
        (tmp / "comparison.md").write_text(markdown)
        for name in REPORT_FILES:
            parent.log_artifact(tmp / name)
        parent.log_metrics({f"{name}_{key}": value for name, result in results.items()
                            for key, value in result.metrics.items()
                            if key in ("test_accuracy", "test_top5_accuracy", "test_macro_f1",
                                       "best_val_accuracy")})
        # MLflow's UI shows this tag as the run's description (rendered markdown).
        parent.set_tags({tracking_runs.NOTE_TAG: markdown[:7900],
                         "registered_model_version": registered_version})
        reused = [name for name in results if name not in adopted]
    best = results[champion].metrics
    return (f"champion {champion} (validation accuracy {best['best_val_accuracy']:.3f}, test "
            f"{best['test_accuracy']:.3f}) -> {config.registered_model} v{registered_version} "
            f"@{CHAMPION_ALIAS}; pipeline run {parent.run_id} groups "
            f"{', '.join(adopted) or 'no new runs'}"
            + (f" (reused: {', '.join(reused)})" if reused else "")
            + f"; report in {out}/")
