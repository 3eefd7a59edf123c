"""The report stage (foodtransfer.stages.report, pipeline/report.py) on hand-made variant outputs: the
champion is chosen on validation, never on test; comparison.md, the figures, the parent MLflow
run that nests the variant runs, the registered champion; and clear errors. No TensorFlow:
the logged models here are tiny pyfunc stand-ins."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import stage_args
from foodtransfer.config import Params, parse_params
from foodtransfer.data.images import ImageStoreWriter
from foodtransfer.errors import ConfigError, DataError, TrackingError
from foodtransfer.markdown import ReportContext, comparison_markdown
from foodtransfer.stages.report import (REPORT_FILES, VARIANTS, VariantSource, changed_params,
                                        choose_best, load_results, most_confident_mistakes, run,
                                        write_figures)

CLASSES = ["pizza", "sushi", "tacos"]
# Validation accuracy picks dropout; baseline has the best *test* accuracy and must not win.
SCORES = {"baseline": (0.70, 0.95), "transfer": (0.80, 0.80), "dropout": (0.90, 0.85),
          "finetune": (0.85, 0.90)}  # (best_val_accuracy, test_accuracy)


def write_variant(root: Path, variant: str, run_id: str, val_accuracy: float,
                  test_accuracy: float, first_epoch: int = 1, epochs: int = 3) -> None:
    metrics = {"test_accuracy": test_accuracy, "test_top5_accuracy": 1.0,
               "test_macro_f1": test_accuracy - 0.05, "test_loss": 0.5,
               "best_val_accuracy": val_accuracy, "best_val_loss": 1 - val_accuracy,
               "epochs_run": epochs, "best_epoch": first_epoch + epochs - 2,
               "seconds_per_epoch": 0.25, "total_params": 1000, "trainable_params": 100,
               "per_class": {}}
    if variant == "baseline":
        metrics["untrained_test_accuracy"] = 0.33
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / f"{variant}.json").write_text(json.dumps(metrics))
    plots = root / "plots" / variant
    plots.mkdir(parents=True, exist_ok=True)
    epoch = np.arange(first_epoch, first_epoch + epochs)
    pd.DataFrame({"epoch": epoch, "loss": 1 / epoch, "accuracy": 1 - 1 / (epoch + 1),
                  "val_loss": 1.1 / epoch, "val_accuracy": 0.9 - 1 / (epoch + 2)}).to_csv(
        plots / "history.csv", index=False)
    rows = []
    for index in range(12):
        actual = CLASSES[index % 3]
        wrong = index < 4  # four mistakes, of decreasing confidence
        predicted = CLASSES[(index + 1) % 3] if wrong else actual
        rows.append({"image_id": f"{actual}/{index}", "actual": actual, "predicted": predicted,
                     "probability": 0.9 - index * 0.05})
    pd.DataFrame(rows).to_csv(plots / "predictions.csv", index=False)
    artifacts = root / "artifacts" / variant
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "classes.json").write_text(json.dumps(CLASSES))
    (artifacts / "mlflow_run.json").write_text(json.dumps({"variant": variant,
                                                           "run_id": run_id}))


@dataclass(frozen=True)
class ReportPaths:
    """What the report stage reads and writes, laid out as dvc.yaml's paths under a root."""

    root: Path
    trimmed: Path
    split: Path
    reports: Path

    @property
    def sources(self) -> list[VariantSource]:
        return [VariantSource(self.root / "metrics" / f"{variant}.json",
                              self.root / "plots" / variant, self.root / "artifacts" / variant)
                for variant in VARIANTS]


def run_report(params: Params, paths: ReportPaths) -> str:
    return run(params, paths.trimmed, paths.split, paths.sources, paths.reports)


def write_outputs(root: Path, run_ids: dict[str, str]) -> ReportPaths:
    """What the data and variant stages leave behind, for 12 test images of 3 classes."""
    for variant in VARIANTS:
        val, test = SCORES[variant]
        first = 4 if variant == "finetune" else 1  # fine-tune continues dropout's epochs
        write_variant(root, variant, run_ids[variant], val, test, first_epoch=first)
    trimmed, split = root / "data" / "trimmed", root / "data" / "split"
    trimmed.mkdir(parents=True)
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with ImageStoreWriter(trimmed / "test.npy", 8) as writer:
        for _ in range(12):
            writer.append(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    manifest = pd.DataFrame({"store": "test", "index": range(12),
                             "image_id": [f"{CLASSES[i % 3]}/{i}" for i in range(12)],
                             "class_name": [CLASSES[i % 3] for i in range(12)],
                             "label": [i % 3 for i in range(12)]})
    for name in ("train", "val", "test"):
        manifest.to_csv(split / f"{name}.csv", index=False)
    return ReportPaths(root, trimmed, split, root / "reports")


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100, path


# ------------------------------------------------------------------------- pure logic
@pytest.fixture
def outputs(tmp_path: Path) -> ReportPaths:
    return write_outputs(tmp_path, {v: f"{v}-run" for v in VARIANTS})


def test_champion_is_chosen_on_validation_never_test(outputs: ReportPaths) -> None:
    results = load_results(outputs.sources)
    assert choose_best(results) == "dropout"  # baseline has the best test accuracy
    assert choose_best(results, ("transfer", "dropout")) == "dropout"
    assert choose_best(results, ("baseline", "transfer")) == "transfer"


def test_validation_ties_go_to_the_lower_validation_loss(outputs: ReportPaths) -> None:
    results = load_results(outputs.sources)
    for name in ("transfer", "dropout"):
        results[name].metrics["best_val_accuracy"] = 0.9
    results["transfer"].metrics["best_val_loss"] = 0.05
    assert choose_best(results) == "transfer"
    results["transfer"].metrics["best_val_loss"] = results["dropout"].metrics["best_val_loss"]
    assert choose_best(results) == "transfer"  # full tie: the first in pipeline order


def test_changed_params_lists_only_differences() -> None:
    assert changed_params(Params()) == {}
    params = parse_params({"dropout": 0.3, "data": {"source": "sample"}})
    assert changed_params(params) == {"dropout": (0.3, 0.6), "data.source": ("sample", "food101")}


def test_comparison_markdown(outputs: ReportPaths) -> None:
    results = load_results(outputs.sources)
    context = ReportContext(experiment="exp", data_version="abc123def456", parent_run_id="P1",
                            registered_model="food-candidates", production_model="food",
                            registered_version="7",
                            run_owner={"baseline": "P0", "transfer": "P1", "dropout": "P1",
                                       "finetune": "P1"})
    text = comparison_markdown(results, "dropout", {"dropout": (0.3, 0.6)}, context)
    for variant in VARIANTS:
        assert f"`{variant}-run`" in text
        assert any(line.startswith(f"| {variant} ") or line.startswith(f"| **{variant}**")
                   for line in text.splitlines()), variant
    assert "| **dropout** | 0.850 | 1.000 | 0.800 | 0.900 | 3 | 2 | 0.25 | 100 / 1,000 |" in text
    assert "abc123def456" in text and "`P1`" in text
    assert ("registered as version 7 of `food-candidates` and promoted: `@champion` of `food` "
            "now points at a copy of it, `models:/food@champion`") in text
    assert "reused from pipeline run `P0`" in text  # baseline came from an earlier run
    assert "| `dropout` | 0.3 | 0.6 |" in text
    assert "untrained baseline scores 0.330" in text


def write_predictions(path: Path, wrong: set[int], images: int = 40) -> None:
    rows = [{"image_id": f"img/{index}", "actual": CLASSES[index % 3],
             "predicted": CLASSES[(index + 1) % 3] if index in wrong else CLASSES[index % 3],
             "probability": 0.8} for index in range(images)]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_paired_tests_and_the_champion_against_the_runner_up(outputs: ReportPaths) -> None:
    from foodtransfer.stages.report import compare_pair, paired_tests, runner_up

    # 40 test images: dropout wrong on 0-1, transfer on 0-9 (so only dropout right on 2-9:
    # 8 discordant images, all for dropout: p = 2 / 2**8), finetune on 0-2, baseline on 0-19.
    wrong = {"baseline": set(range(20)), "transfer": set(range(10)), "dropout": {0, 1},
             "finetune": {0, 1, 2}}
    for variant, mistakes in wrong.items():
        write_predictions(outputs.root / "plots" / variant / "predictions.csv", mistakes)
        write_predictions(outputs.root / "artifacts" / variant / "val_predictions.csv",
                          mistakes, images=30)
    results = load_results(outputs.sources)
    pairs = paired_tests(results)
    assert [(p.a, p.b) for p in pairs] == [
        ("transfer", "baseline"), ("dropout", "transfer"), ("finetune", "dropout"),
        ("dropout", "baseline"), ("finetune", "transfer"), ("finetune", "baseline")]
    dropout_vs_transfer = pairs[1].test
    assert (dropout_vs_transfer.only_a_right, dropout_vs_transfer.only_b_right) == (8, 0)
    assert dropout_vs_transfer.difference == pytest.approx(8 / 40)
    assert dropout_vs_transfer.p_value == pytest.approx(2 / 2**8)
    assert pairs[1].validation.difference == pytest.approx(8 / 30)
    finetune_vs_dropout = pairs[2].test
    assert (finetune_vs_dropout.only_a_right, finetune_vs_dropout.only_b_right) == (0, 1)
    assert finetune_vs_dropout.p_value == pytest.approx(1.0)

    assert choose_best(results) == "dropout" and runner_up(results, "dropout") == "finetune"
    context = ReportContext(experiment="exp", data_version="abc123def456")
    text = comparison_markdown(results, "dropout", {}, context, pairs,
                               compare_pair(results, "dropout", "finetune"))
    assert ("dropout vs transfer: +20.0 points [+7.5, +32.5], McNemar p = 0.008: "
            "significant at the 0.05 level") in text
    assert ("finetune vs dropout: \u22122.5 points [\u22127.5, +0.0], McNemar p = 1.00: "
            "not significant at the 0.05 level") in text
    assert "dropout vs baseline: +45.0 points [+30.0, +60.0], McNemar p < 0.001: signif" in text
    assert ("The champion is not significantly better than the runner-up finetune: on "
            "validation +3.3 points [+0.0, +10.0], McNemar p = 1.00; on test +2.5 points "
            "[+0.0, +7.5], McNemar p = 1.00.") in text
    assert "| dropout vs transfer | +20.0 | [+7.5, +32.5] | 8 / 0 | 0.008 | 0.02 | yes | " \
        "+26.7 |" in text  # raw p, then Holm's over the 6 pairs
    # With a clear winner: significantly better on both.
    text = comparison_markdown(results, "dropout", {}, context, pairs,
                               compare_pair(results, "dropout", "baseline"))
    assert ("The champion is significantly better than the runner-up baseline on validation "
            "and test") in text


def test_figures_are_valid_images(outputs: ReportPaths, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    out.mkdir()
    write_figures(load_results(outputs.sources), "dropout", outputs.trimmed, outputs.split, out)
    for name in ("curves.png", "confusion.png", "errors.png"):
        assert_png(out / name)


def test_most_confident_mistakes_come_first(outputs: ReportPaths) -> None:
    predictions = load_results(outputs.sources)["dropout"].predictions
    mistakes = most_confident_mistakes(predictions, 3)
    assert list(mistakes["image_id"]) == ["pizza/0", "sushi/1", "tacos/2"]
    assert (mistakes["actual"] != mistakes["predicted"]).all()
    perfect = predictions.assign(predicted=predictions["actual"])
    assert most_confident_mistakes(perfect).empty


def test_missing_or_inconsistent_variant_outputs(outputs: ReportPaths) -> None:
    (outputs.root / "artifacts" / "transfer" / "mlflow_run.json").unlink()
    with pytest.raises(DataError, match=r"mlflow_run.json is missing: run 'dvc repro transfer'"):
        load_results(outputs.sources)
    write_variant(outputs.root, "transfer", "t", 0.5, 0.5)
    (outputs.root / "artifacts" / "dropout" / "classes.json").write_text(
        json.dumps(["a", "b", "c"]))
    with pytest.raises(DataError, match="different classes"):
        load_results(outputs.sources)
    with pytest.raises(DataError, match="no variants to compare"):
        load_results([])


def test_registered_model_name_is_validated() -> None:
    assert Params().mlflow.registered_model == "food101-classifier"
    with pytest.raises(ConfigError, match=r"mlflow.registered_model = 'a/b' is not a usable"):
        parse_params({"mlflow": {"registered_model": "a/b"}})
    with pytest.raises(ConfigError, match="unknown key 'mlflow.registered_modle'"):
        parse_params({"mlflow": {"registered_modle": "x"}})


# ----------------------------------------------------------------- with an MLflow store
@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Keras classifier of the three classes and its class names: what a variant
    stage logs (promotion rebuilds the production pyfunc around them)."""
    import keras

    folder = tmp_path_factory.mktemp("tiny-keras")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    model.save(folder / "model.keras")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return folder / "model.keras", folder / "classes.json"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project folder whose MLflow store is the default one (mlruns/mlflow.db)."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    yield project
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def log_variant_run(experiment: str, variant: str, keras_files: tuple[Path, Path]) -> str:
    """A finished variant run with a logged model and its model_uri tag, as the stages make."""
    from foodtransfer.tracking.models import log_model
    from foodtransfer.tracking.runs import tracked_run

    with tracked_run(experiment, variant, "variant", {"dropout": 0.6},
                     {"data_version": "v"}) as tracked:
        model_uri = log_model(*keras_files, np.zeros((1, 8, 8, 3), np.uint8))
        tracked.set_tags({"model_uri": model_uri})
        return tracked.run_id


def test_tracked_run_tags_the_run_and_leaves_the_callers_tags_alone(store: Path) -> None:
    from foodtransfer.tracking.runs import tracked_run

    tags = {"data_version": "v1", "variant": "transfer"}
    with tracked_run("unit", "transfer", "variant", {"seed": 3, "weights": None}, tags) as run:
        run_id = run.run_id
    assert tags == {"data_version": "v1", "variant": "transfer"}
    logged = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}").get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"seed": "3", "weights": "null"}
    assert {"data_version": "v1", "variant": "transfer", "run_kind": "variant"}.items() \
        <= logged.data.tags.items()
    assert logged.data.tags["pid"].isdigit() and logged.data.tags["host"]
    with pytest.raises(RuntimeError, match="boom"), \
            tracked_run("unit", "transfer", "variant", {}, tags) as run:
        raise RuntimeError("boom")
    failed = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}").get_run(
        run.run_id)
    assert failed.info.status == "FAILED"


def test_report_groups_runs_and_registers_the_champion(store: Path, tiny_keras) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    params = parse_params({"dropout": 0.3, "mlflow": {"experiment": "unit",
                                                      "registered_model": "food"}})
    run_ids = {variant: log_variant_run("unit", variant, tiny_keras) for variant in VARIANTS}
    paths = write_outputs(store, run_ids)
    summary = run_report(params, paths)
    assert "champion dropout" in summary
    assert "-> food-candidates v1; food v1 @champion" in summary  # the workspace promotes

    for name in REPORT_FILES:
        assert (paths.reports / name).stat().st_size > 0
    for name in ("curves.png", "confusion.png", "errors.png"):
        assert_png(paths.reports / name)
    text = (paths.reports / "comparison.md").read_text()
    assert all(run_id in text for run_id in run_ids.values())
    assert "| `dropout` | 0.3 | 0.6 |" in text

    experiment = client.get_experiment_by_name("unit")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "tags.run_kind = 'pipeline'")
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.tags["data_version"] == text.split("data version `")[1][:12]
    assert parent.data.tags["champion"] == "dropout"
    assert parent.data.tags["variant_run_id.baseline"] == run_ids["baseline"]
    assert "Champion: dropout" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["dropout_best_val_accuracy"] == pytest.approx(0.9)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(REPORT_FILES)
    for run_id in run_ids.values():
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["pipeline_run_id"] == parent.info.run_id

    champion = client.get_model_version_by_alias("food", "champion")
    assert champion.tags["candidate_run_id"] == run_ids["dropout"]
    assert champion.tags["variant"] == "dropout" and champion.tags["candidate_version"] == "1"
    # The production copy's files live in a run of the production experiment, not in the
    # candidate's run (which whoever may train could overwrite).
    promotion = client.get_run(champion.run_id)
    production = client.get_experiment_by_name("food-production")
    assert promotion.info.experiment_id == production.experiment_id
    assert promotion.data.tags["candidate_version"] == "1"
    assert champion.source.startswith("models:/m-")  # a logged model, MLflow 3's way
    logged = client.get_logged_model(champion.source[len("models:/"):])
    assert logged.source_run_id == promotion.info.run_id
    assert logged.experiment_id == \
        production.experiment_id  # rebuilt there around the candidate's Keras file
    local = Path(mlflow.artifacts.download_artifacts(
        f"models:/food/{champion.version}",
        tracking_uri=f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"))
    assert (local / "MLmodel").is_file()
    assert json.loads(champion.tags["class_names"]) == CLASSES
    assert "raw RGB images" in client.get_registered_model("food-candidates").description

    # A second execution that re-trains only finetune (now the best on validation): the new
    # parent nests only finetune, the others stay with the run that trained them.
    new_finetune = log_variant_run("unit", "finetune", tiny_keras)
    write_variant(store, "finetune", new_finetune, 0.95, 0.5, first_epoch=4)
    summary = run_report(params, paths)
    assert "groups finetune (reused: baseline, transfer, dropout)" in summary
    second = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pipeline'",
                                order_by=["attributes.start_time DESC"])[0]
    assert second.info.run_id != parent.info.run_id
    assert client.get_run(new_finetune).data.tags["mlflow.parentRunId"] == second.info.run_id
    assert (client.get_run(run_ids["baseline"]).data.tags["mlflow.parentRunId"]
            == parent.info.run_id)
    assert f"reused from pipeline run `{parent.info.run_id}`" in (
        paths.reports / "comparison.md").read_text()
    champion = client.get_model_version_by_alias("food", "champion")
    assert (str(champion.version), champion.tags["candidate_run_id"]) == ("2", new_finetune)
    assert champion.tags["candidate_version"] == "2"

    # Re-running the report is another execution: its winner gets a candidate version of its
    # own (the same model), with its own provenance, and is promoted.
    run_report(params, paths)
    assert len(client.search_model_versions("name = 'food-candidates'")) == 3
    assert len(client.search_model_versions("name = 'food'")) == 3
    third = client.get_model_version_by_alias("food", "champion")
    assert str(third.version) == "3" and third.tags["candidate_run_id"] == new_finetune
    assert third.tags["pipeline_run_id"] != champion.tags["pipeline_run_id"]


def test_report_fails_clearly_on_a_run_missing_from_the_store(store: Path, tiny_keras) -> None:
    params = parse_params({"mlflow": {"experiment": "unit"}})
    run_ids = {variant: log_variant_run("unit", variant, tiny_keras) for variant in VARIANTS}
    run_ids["transfer"] = "0" * 32
    paths = write_outputs(store, run_ids)
    with pytest.raises(TrackingError, match=r"run 0{32} of variant 'transfer' .* is not in the "
                                            r"store .*dvc repro --force transfer"):
        run_report(params, paths)
    assert not paths.reports.exists()


def test_report_stage_script(store: Path, tiny_keras) -> None:
    """pipeline/report.py: the one-line summary, and exit code 2 with one line on bad params."""
    import importlib.util

    from typer.testing import CliRunner

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("pipeline_report",
                                                  REPO_ROOT / "pipeline" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (store / "params.yaml").write_text("mlflow:\n  experiment: unit\n  registered_model: a:b\n")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(module.app, stage_args("report"))
        assert result.exit_code == 2
        assert "report: error: params: mlflow.registered_model = 'a:b'" in result.output
        (store / "params.yaml").write_text("mlflow:\n  experiment: unit\n")
        write_outputs(store, {variant: log_variant_run("unit", variant, tiny_keras)
                              for variant in VARIANTS})
        result = CliRunner().invoke(module.app, stage_args("report"))
        assert result.exit_code == 0, result.output
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("report: champion dropout") and "report in reports/" in last
        assert (store / "reports" / "comparison.md").is_file()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_an_experiment_moves_the_challenger_and_a_first_one_the_champion_too(
        store: Path, tiny_keras, monkeypatch) -> None:
    """Inside a DVC experiment (DVC_EXP_NAME) the winner gets @challenger of the candidates;
    the champion stays, unless there is none yet. The report says what the registry did. An
    unregistered variant is refused, naming the registry."""
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    params = parse_params({"mlflow": {"experiment": "unit", "registered_model": "food"}})
    run_ids = {variant: log_variant_run("unit", variant, tiny_keras) for variant in VARIANTS}
    paths = write_outputs(store, run_ids)
    monkeypatch.setenv("DVC_EXP_NAME", "first-exp")
    first = run_report(params, paths)
    assert "food-candidates v1 @challenger, food v1 @champion;" in first
    assert "and promoted: `@champion` of `food`" in (paths.reports / "comparison.md").read_text()
    monkeypatch.setenv("DVC_EXP_NAME", "second-exp")
    second = run_report(params, paths)
    assert "food-candidates v2 @challenger;" in second and "@champion" not in second
    assert str(client.get_model_version_by_alias("food", "champion").version) == "1"
    challenger = client.get_model_version_by_alias("food-candidates", "challenger")
    assert str(challenger.version) == "2" and challenger.tags["dvc_exp_name"] == "second-exp"
    assert ("with the alias `@challenger`, `models:/food-candidates@challenger`; `@champion` "
            "of `food` did not move (`foodtransfer promote 2` moves it)") in (
        paths.reports / "comparison.md").read_text()

    from foodtransfer.errors import DataError

    unknown = VariantSource(paths.root / "metrics" / "wide.json", paths.root / "plots" / "wide",
                            paths.root / "artifacts" / "wide")
    with pytest.raises(DataError, match=r"'wide' is not a registered variant .*variants\.py"):
        load_results([*paths.sources, unknown])


def test_the_alias_moves_after_the_run_ended_and_the_files_landed(
        store: Path, tiny_keras, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill at any point before the alias moves leaves the champion where it was: when it
    moves, the pipeline run has ended FINISHED with its files published and marked so."""
    from foodtransfer.tracking import registry

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    params = parse_params({"mlflow": {"experiment": "unit", "registered_model": "food"}})
    paths = write_outputs(store, {v: log_variant_run("unit", v, tiny_keras) for v in VARIANTS})
    seen = {}
    real = registry.settle_aliases

    def observed(name: str, version: str, experiment: bool) -> list[str]:
        unit = client.get_experiment_by_name("unit")
        (parent,) = client.search_runs([unit.experiment_id],
                                       "tags.run_kind = 'pipeline'")
        seen.update(status=parent.info.status, outputs=parent.data.tags.get("outputs"),
                    published=sorted(p.name for p in paths.reports.iterdir()))
        return real(name, version, experiment)

    monkeypatch.setattr(registry, "settle_aliases", observed)
    run_report(params, paths)
    assert seen == {"status": "FINISHED", "outputs": "published",
                    "published": sorted(REPORT_FILES)}
    assert str(client.get_model_version_by_alias("food", "champion").version) == "1"


def test_a_finished_run_whose_files_never_landed_is_marked_by_the_next_run(
        store: Path) -> None:
    """A process killed after its run ended FINISHED and before its files were renamed into
    place: the next run on this host marks it outputs=lost (compare then leaves it out)."""
    import socket
    import subprocess
    import sys

    from foodtransfer.tracking.runs import tracked_run

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with tracked_run("unit", "dropout", "variant", {}, {}, stages=["dropout"]) as killed:
        pass  # its files would land here, after the run ended: the process died instead
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    client.set_tag(killed.run_id, "pid", dead)
    assert client.get_run(killed.run_id).data.tags["outputs"] == "pending"
    with tracked_run("unit", "dropout", "variant", {}, {}, stages=["dropout"]):
        pass
    tags = client.get_run(killed.run_id).data.tags
    assert tags["outputs"] == "lost" and tags["host"] == socket.gethostname()
    assert "before the stage's files landed" in tags["mlflow.note.content"]


def test_promotion_rebuilds_the_model_and_refuses_a_keras_file_that_runs_code(
        store: Path, tmp_path: Path) -> None:
    """A candidate whose Keras file holds a Lambda layer (Python code Keras would run on
    loading) is not promoted: only safe-mode Keras files and class names cross over."""
    import keras

    from foodtransfer.errors import TrackingError
    from foodtransfer.tracking.registry import copy_to_production

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x[:, 0, 0, :])(inputs))
    model.save(tmp_path / "lambda.keras")
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    run_id = log_variant_run("unit", "dropout", (tmp_path / "lambda.keras",
                                                 tmp_path / "classes.json"))
    client = mlflow.MlflowClient()
    mlflow.register_model(client.get_run(run_id).data.tags["model_uri"], "food-candidates")
    with pytest.raises(TrackingError, match="does not load in Keras' safe mode"):
        copy_to_production("food", "1")
    assert client.search_model_versions("name = 'food'") == []
    (promotion,) = client.search_runs(
        [client.get_experiment_by_name("food-production").experiment_id])
    assert promotion.info.status == "FAILED"


def test_promotion_reads_only_files_inside_the_candidates_model(tmp_path: Path) -> None:
    """A candidate's MLmodel (which its trainer may rewrite) whose artifacts point outside the
    downloaded model is refused before anything is read."""
    from foodtransfer.errors import TrackingError
    from foodtransfer.tracking.registry import rebuild_model

    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "secret.json").write_text(json.dumps(CLASSES))
    (model / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      keras_model: {path: ../secret.json}\n      class_names: {path: ../secret.json}\n")
    with pytest.raises(TrackingError, match="its artifacts point outside the model"):
        rebuild_model(model)
    (model / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(TrackingError, match="is not what this pipeline logs"):
        rebuild_model(model)
