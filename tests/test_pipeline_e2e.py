"""End to end: `dvc repro` and `dvc exp run -S dropout=0.3` on a tiny generated sample in a
temporary git repository, then a look at everything they produced: DVC metrics and plots files,
the MLflow runs (params, per-epoch metrics, tags, artifacts) and the logged models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import merge_params
from foodtransfer.variants import NAMES as registered_variants

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
VARIANTS = registered_variants  # the registry: every check below covers each variant
ALL_STAGES = ("download", "trim", "split", "features", *VARIANTS, "report")

# The default recipe (features.crop 0.875: the backbone sees 32 of 36 px, 2 augmented views,
# TTA; 4 fine-tune views, cosine) at a tiny size, on the suite's stand-in backbone (weights
# set by make_repo).
TINY = {
    "image_size": 36, "backbone": "MobileNetV2", "batch_size": 16,
    "epochs": 6, "patience": 3,
    "data": {"source": "sample", "classes": ["apple_pie", "pizza", "sushi", "tacos"],
             "samples_per_class": 30, "test_per_class": 8,
             "sample": {"train_per_class": 34, "test_per_class": 10, "min_side": 24,
                        "max_side": 56}},
    # A weaker CNN than the transfer variants, so that a transfer variant is the champion.
    "baseline": {"epochs": 2, "image_size": 32},
    "finetune": {"epochs": 1, "unfreeze": 5},
    "mlflow": {"experiment": "e2e"},
}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900
        ) -> subprocess.CompletedProcess:
    """``command`` to completion (a bound for a hung command, far above what it needs on a
    quiet machine: give more to what runs several pipelines)."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z]+)'", output))


def make_repo(root: Path, overrides: dict, weights: Path | None = None
              ) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC repository holding the project's pipeline with tiny params; with
    ``weights`` (the suite's stand-in backbone), that file in weights/, tracked by DVC, and
    ``weights`` set to it, as a user brings local weights."""
    from conftest import add_weights

    repo = root / "project"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(PROJECT / name, repo / name)
    for name in ("pipeline", "src", "weights"):
        shutil.copytree(PROJECT / name, repo / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.h5",
                                                      "*.dvc"))
    # Not FOODTRANSFER_PROGRESS either: the stages print progress lines as in any log.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "DVC_", "FOODTRANSFER_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               # The workspace's package on the path, as `pip install -e .` in the project
               # puts it: a stage that ran from a copy of the tree (DVC's queue, --temp)
               # would import the workspace's code, not its own, were it not for the first
               # lines of each pipeline/ script (test_queued_experiments_run_their_own_code).
               PYTHONPATH=str(repo / "src"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               DVC_NO_ANALYTICS="1",
               # Tiny stages last seconds: sample the system metrics every second.
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    if weights is not None:
        overrides = merge_params(overrides, {"weights": add_weights(repo, weights, env)})
    params = merge_params(yaml.safe_load((PROJECT / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pipeline"], repo, env)
    return repo, env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, standin_weights):
    repo, env = make_repo(tmp_path_factory.mktemp("e2e"), TINY, standin_weights)
    # The first run records which params each stage reads (the DAG test's params check).
    recorded = tmp_path_factory.mktemp("params_read")
    first = run(["dvc", "repro"], repo, {**env, "FOODTRANSFER_RECORD_PARAMS": str(recorded)})
    snapshot = {v: json.loads((repo / f"metrics/{v}.json").read_text()) for v in VARIANTS}
    second = run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline run"], repo, env)
    experiment = run(["dvc", "exp", "run", "-S", "dropout=0.3", "-n", "drop03"], repo, env)
    # A code change must make DVC call stale exactly the stages whose code it is.
    evaluation = repo / "src" / "foodtransfer" / "evaluation.py"
    original = evaluation.read_text()
    evaluation.write_text(original.replace("float(np.mean(predicted == labels))",
                                           "float(np.mean(labels == predicted))"))
    stale = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
    evaluation.write_text(original)
    fresh = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
    return {"repo": repo, "env": env, "first": first, "second": second,
            "experiment": experiment, "first_metrics": snapshot, "params_read": recorded,
            "status_after_code_edit": stale, "status_after_revert": fresh}


def mlflow_runs(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    assert experiment is not None, "the experiment named in params was not created"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    # The variant runs; the report stage's parent runs are checked by test_report_* below.
    runs = [r for r in runs if r.data.tags.get("run_kind") != "pipeline"]
    return client, experiment, runs


def test_repro_runs_every_stage_then_nothing(pipeline):
    assert stages_run(pipeline["first"].stdout) == set(ALL_STAGES)
    assert stages_run(pipeline["second"].stdout) == set()
    for stage in ALL_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in pipeline["second"].stdout


def test_progress_in_a_log_is_whole_lines_at_a_bounded_rate(pipeline):
    output = pipeline["first"].stdout + pipeline["first"].stderr
    assert "\r" not in output  # no redrawn bars in a log
    assert len(output.splitlines()) < 400
    for stage in VARIANTS:
        assert re.search(rf"^{stage}: epoch 1/\d+( \(\d+ overall\))?: loss \d\.\d{{3}}, "
                         r"accuracy \d\.\d{3}, val_loss \d\.\d{3}, val_accuracy \d\.\d{3}, "
                         r"lr [\d.e-]+, \d+\.\d\d s/epoch(, ETA <= \d+ (s|min \d\d s))?$",
                         output, re.M), stage
        assert re.search(rf"^{stage}: kept the weights of epoch \d+ of \d+: the best "
                         r"validation accuracy \(ties: the lower validation loss\)",
                         output, re.M), stage
    for stage, what in (("trim", "decoded images"), ("features", "backbone passes")):
        assert re.search(rf"^{stage}: {what}: (\d+)/\1 images \(100 %\), [\d.]+ images/s, "
                         r"done in \d+ s$", output, re.M), (stage, what)
    # The fine-tune trains on the features stage's frozen-bottom cache: no pass of its own.
    assert "frozen-bottom cache:" not in output and "builds its own" not in output


def test_a_code_edit_makes_exactly_its_stages_stale(pipeline):
    from test_dag import code_deps, script_of, stages

    users = {name for name, spec in stages().items()
             if "src/foodtransfer/evaluation.py" in code_deps(script_of(spec))}
    assert users == {"baseline", "transfer", "dropout", "finetune", "report"}
    stale = pipeline["status_after_code_edit"]
    assert set(stale) == users, stale
    for name in users:
        assert {"changed deps": {"src/foodtransfer/evaluation.py": "modified"}} in stale[name]
    assert pipeline["status_after_revert"] == {}


def test_exp_run_reruns_only_dropout_and_finetune(pipeline):
    assert stages_run(pipeline["experiment"].stdout) == {"dropout", "finetune", "report"}
    show = run(["dvc", "exp", "show", "--json"], pipeline["repo"], pipeline["env"])
    text = show.stdout
    assert "drop03" in text and "test_accuracy" in text
    data = json.loads(text)
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "drop03":
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    assert found, "experiment drop03 missing from dvc exp show"
    params = json.dumps(found[0])
    assert '"dropout": 0.3' in params


def test_metrics_and_plots_files(pipeline):
    repo = pipeline["repo"]
    for variant in VARIANTS:
        metrics = json.loads((repo / f"metrics/{variant}.json").read_text())
        for key in ("test_accuracy", "test_top5_accuracy", "test_macro_f1", "test_loss",
                    "best_val_accuracy", "epochs_run", "best_epoch", "seconds_per_epoch",
                    "total_params", "trainable_params"):
            assert key in metrics, f"{variant}: {key} missing"
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
        for name in ("test_accuracy", "test_top5_accuracy", "test_macro_f1"):
            assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
        val = pd.read_csv(repo / f"artifacts/{variant}/val_predictions.csv")
        assert np.mean(val["actual"] == val["predicted"]) == pytest.approx(
            metrics["best_val_accuracy"])
        assert "per_class" not in metrics  # detail, not a column of dvc exp show
        per_class = json.loads((repo / f"artifacts/{variant}/per_class.json").read_text())
        assert set(per_class) == set(TINY["data"]["classes"])
        history = pd.read_csv(repo / f"plots/{variant}/history.csv")
        assert len(history) == metrics["epochs_run"] >= 1
        assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
        predictions = pd.read_csv(repo / f"plots/{variant}/predictions.csv")
        assert len(predictions) == 4 * TINY["data"]["test_per_class"]
        assert set(predictions["actual"]) == set(TINY["data"]["classes"])
        for name in ("learning_curves.png", "confusion.png", "classification_report.txt"):
            assert (repo / f"artifacts/{variant}/{name}").stat().st_size > 0
    baseline = json.loads((repo / "metrics/baseline.json").read_text())
    assert "untrained_test_accuracy" in baseline
    # The sample carries a learnable signal: the CNN from scratch beats chance (0.25) in two
    # epochs (kept short so that a transfer variant wins: see TINY).
    assert baseline["best_val_accuracy"] >= 0.4, baseline
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    dropout = pipeline["first_metrics"]["dropout"]
    assert finetune["first_epoch"] == dropout["epochs_run"] + 1  # curves continue
    assert finetune["trainable_params"] > dropout["trainable_params"]
    # The dropout model's backbone is the features stage's (same weights file), so the
    # fine-tune took that stage's cache of its frozen bottom.
    assert finetune["bottom_from_features"] == 1 and finetune["cached_bottom"] == 1
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["test_images"] == 4 * TINY["data"]["test_per_class"]
    assert split["train_images"] + split["val_images"] == 4 * TINY["data"]["samples_per_class"]


# ------------------------------------------------- the transfer path learns, and pairs right
# The bar: on the stand-in backbone (frozen, pretrained on 8 other generated classes) the four
# generated classes are told apart by a linear probe almost perfectly; chance is 0.25 and a
# head on random-weight features (~1e-12) predicts one class for everything. 0.75 leaves room
# for the seed's noise on 24 validation and 32 test images while no broken pairing reaches it.
LEARNS = 0.75


def test_every_variant_learns_and_deploys_what_it_evaluated(pipeline):
    for variant in VARIANTS:
        metrics = pipeline["first_metrics"][variant]
        assert metrics["deployed_model_drift"] <= 1e-3, variant
        if variant == "baseline":  # two epochs from scratch: its bar is in the test below
            continue
        assert metrics["best_val_accuracy"] >= LEARNS, (variant, metrics["best_val_accuracy"])
        assert metrics["test_accuracy"] >= LEARNS, (variant, metrics["test_accuracy"])


def test_a_deployed_model_that_differs_from_the_evaluated_one_fails_the_stage(
        pipeline, tmp_path, monkeypatch):
    """The deployed-model check itself: the transfer stage, made to log an image model whose
    preprocessing differs from the evaluated path (no mirror averaging where the cached
    predictions have it), fails with the check's error, publishes nothing, and its MLflow
    run ends FAILED."""
    import mlflow

    from foodtransfer.config import load_params
    from foodtransfer.models import classifiers
    from foodtransfer.results import DeployedModelError, VariantPaths
    from foodtransfer.stages import transfer

    repo = pipeline["repo"]
    monkeypatch.chdir(repo)  # the weights param names a file under weights/
    params = load_params(repo / "params.yaml")
    assert params.features.tta  # the evaluated probabilities are mirror-averaged
    real = classifiers.build_image_classifier

    def without_mirror(extractor, head, *, image_size, tta):
        return real(extractor, head, image_size=image_size, tta=False)

    monkeypatch.setattr(transfer, "build_image_classifier", without_mirror)
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    outputs = VariantPaths(*(tmp_path / "out" / name for name in
                             ("transfer.json", "plots", "artifacts", "model")))
    with pytest.raises(DeployedModelError, match=r"the transfer model logged to MLflow .* is "
                                                 r"not the model that was evaluated"):
        transfer.run(params, repo / "data/trimmed", repo / "data/split",
                     repo / "data/features", outputs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    client = mlflow.MlflowClient(store)
    (run_,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run_.info.status == "FAILED" and run_.data.tags["outputs"] == "pending"


def test_the_heads_train_on_views_paired_with_their_labels(pipeline):
    """Each block of the heads' training set (the images, then each augmented view) is
    classified by the trained transfer head as the labels it is paired with say."""
    import keras

    from foodtransfer.data.manifests import load_splits
    from foodtransfer.models.inference import predict_array
    from foodtransfer.stages.transfer import load_cache, training_pairs

    repo = pipeline["repo"]
    views = 2  # the recipe's features.views
    splits = load_splits(repo / "data/split")
    cached = load_cache(repo / "data/features", splits, views=views, tta=True)
    rows, labels = training_pairs(cached, splits["train"].labels, views)
    head = keras.saving.load_model(repo / "models/transfer/head.keras", compile=False)
    predicted = predict_array(head, rows).argmax(axis=1)
    count = len(splits["train"])
    for view in range(views + 1):
        block = slice(view * count, (view + 1) * count)
        agreement = float(np.mean(predicted[block] == labels[block]))
        assert agreement >= LEARNS, (view, agreement)


def test_the_finetune_reads_its_cache_in_order_and_a_new_view_each_epoch(pipeline):
    """The fine-tune's training batches: epoch e holds exactly the cached bottom outputs of
    view e mod (views + 1), each paired with its own label (the dropout model, through the
    trainable top, classifies them as paired)."""
    import keras

    from foodtransfer.data.datasets import views_dataset
    from foodtransfer.data.manifests import load_splits
    from foodtransfer.models.classifiers import (get_backbone_model, split_frozen_bottom,
                                                 unfreeze_top)
    from foodtransfer.models.inference import predict_array
    from foodtransfer.stages.finetune import top_model
    from foodtransfer.training.distribute import make_strategy

    repo = pipeline["repo"]
    views, batch = 4, 16  # the recipe's finetune.views; TINY's batch_size
    labels = load_splits(repo / "data/split")["train"].labels
    count = len(labels)
    cache = np.load(repo / "data/bottom/train.npy")
    model = keras.saving.load_model(repo / "models/dropout/model.keras", compile=False)
    unfreeze_top(get_backbone_model(model), TINY["finetune"]["unfreeze"])
    _, top = split_frozen_bottom(get_backbone_model(model))
    trainable = top_model(model, top, make_strategy("auto"))
    dataset = views_dataset(repo / "data/bottom/train.npy", labels, batch, views=views,
                            epochs=views + 1, seed=1)
    batches = [(np.asarray(x), np.asarray(y)) for x, y in dataset]
    steps = -(-count // batch)
    assert len(batches) == steps * (views + 1)
    for epoch in range(views + 1):
        x = np.concatenate([b[0] for b in batches[epoch * steps:(epoch + 1) * steps]])
        y = np.concatenate([b[1] for b in batches[epoch * steps:(epoch + 1) * steps]])
        block = cache[epoch * count:(epoch + 1) * count]
        assert {row.tobytes() for row in x} == {row.tobytes() for row in block}, epoch
        agreement = float(np.mean(predict_array(trainable, x).argmax(axis=1) == y))
        assert agreement >= LEARNS, (epoch, agreement)


def test_dvc_yaml_lists_exactly_the_params_each_stage_reads(pipeline):
    """The DAG test's params check on this run: each stage recorded the keys it read."""
    from test_dag import params_problems, stages

    recorded = pipeline["params_read"]
    problems = []
    for name, stage in stages().items():
        path = recorded / f"{name}.json"
        assert path.is_file(), f"stage {name} recorded no params (did it run?)"
        problems += [f"dvc.yaml stage '{name}': {problem}"
                     for problem in params_problems(name, stage, json.loads(path.read_text()))]
    assert not problems, "; ".join(problems)


def test_dvc_metrics_and_plots_commands(pipeline):
    repo, env = pipeline["repo"], pipeline["env"]
    shown = run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    for variant in VARIANTS:
        assert f"metrics/{variant}.json" in shown
    out = repo / "plots_html"
    run(["dvc", "plots", "show", "-o", str(out)], repo, env)
    page = (out / "index.html").read_text()
    assert "val_accuracy" in page and "confusion" in page.lower()


def test_mlflow_runs(pipeline):
    repo = pipeline["repo"]
    client, experiment, runs = mlflow_runs(repo)
    assert experiment.artifact_location.startswith((repo / "mlruns").as_uri())
    names = [r.info.run_name for r in runs]
    # One run per variant per execution: four from repro, two from the experiment.
    assert sorted(names) == sorted([*VARIANTS, "dropout", "finetune"])
    assert all(r.info.status == "FINISHED" for r in runs)
    for run_ in runs:
        tags, params = run_.data.tags, run_.data.params
        assert tags["variant"] == run_.info.run_name
        assert re.fullmatch(r"[0-9a-f]{12}", tags["data_version"])
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
        assert params["backbone"] == "MobileNetV2"
        assert params["data.samples_per_class"] == "30"
        assert "test_accuracy" in run_.data.metrics
        history = client.get_metric_history(run_.info.run_id, "val_loss")
        assert len(history) >= 1
        if run_.info.run_name in ("transfer", "dropout", "baseline"):
            assert len(history) >= 2, "per-epoch metrics missing"
            assert [m.step for m in history] == sorted(m.step for m in history)
        artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
        assert {"learning_curves.png", "confusion.png", "classification_report.txt",
                "classes.json"} <= artifacts
        assert tags.get("model_uri"), "model not logged"
    experiment_runs = [r for r in runs if r.data.tags.get("dvc_exp_name") == "drop03"]
    assert sorted(r.info.run_name for r in experiment_runs) == ["dropout", "finetune"]
    assert {r.data.params["dropout"] for r in experiment_runs} == {"0.3"}
    first_dropout = next(r for r in runs if r.info.run_name == "dropout")
    assert first_dropout.data.params["dropout"] == "0.6"


def test_logged_model_predicts_raw_images(pipeline):
    import mlflow

    from foodtransfer.data.images import ImageStore

    repo = pipeline["repo"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    try:
        _, _, runs = mlflow_runs(repo)
        images = ImageStore(repo / "data/trimmed/test.npy").read([0, 1, 2])  # uint8
        for run_ in runs[:4]:
            model = mlflow.pyfunc.load_model(run_.data.tags["model_uri"])
            probabilities = model.predict(images)  # as decoded: uint8
            assert list(probabilities.columns) == TINY["data"]["classes"]
            np.testing.assert_allclose(probabilities.to_numpy().sum(axis=1), 1.0, atol=1e-4)
            np.testing.assert_allclose(model.predict(images.astype("float32")).to_numpy(),
                                       probabilities.to_numpy(), atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------- report and predict
REPORT_FILES = ("comparison.md", "curves.png", "confusion.png", "errors.png", "run.json")
FIGURES = ("curves.png", "confusion.png", "errors.png")


def variant_run_ids(repo: Path) -> dict[str, str]:
    return {v: json.loads((repo / f"artifacts/{v}/mlflow_run.json").read_text())["run_id"]
            for v in VARIANTS}


def pipeline_runs(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pipeline'",
                              order_by=["attributes.start_time ASC"])
    return client, runs


def test_report_files_compare_the_four_variants(pipeline):
    from PIL import Image

    repo = pipeline["repo"]
    text = (repo / "reports" / "comparison.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for variant, run_id in variant_run_ids(repo).items():
        assert any(re.match(rf"\| (\*\*)?{variant}(\*\*)? \|", row) and f"`{run_id}`" in row
                   for row in table), (variant, text)
    metrics = json.loads((repo / "metrics/dropout.json").read_text())
    assert f"{metrics['test_accuracy']:.3f}" in text
    from foodtransfer.data.manifests import data_version

    assert f"data version `{data_version(repo / 'data/split')}`" in text
    assert "| `dropout` | 0.3 | 0.6 |" in text and "| `backbone` | MobileNetV2 |" in text
    assert "DVC experiment `drop03`" in text
    # Intervals on every metric, and the paired tests between the variants.
    assert re.search(rf"{metrics['test_accuracy']:.3f} \[\d\.\d{{3}}, \d\.\d{{3}}\]", text)
    assert "## Which differences hold" in text
    assert re.search(r"- finetune vs dropout: [+\u2212]\d+\.\d points \[.*\], McNemar p "
                     r"(= \d\.\d+|< 0\.001): (not )?significant at the 0\.05 level\.", text)
    assert re.search(r"The champion is (not )?significantly better than the runner-up", text)
    ran = json.loads((repo / "reports" / "run.json").read_text())
    client, parents = pipeline_runs(repo)
    assert ran["pipeline_run_id"] == parents[-1].info.run_id  # the run that wrote the report
    assert parents[-1].data.tags["registered_model_version"] == ran["registered_version"]
    for name in FIGURES:
        with Image.open(repo / "reports" / name) as image:
            image.verify()
            assert image.format == "PNG"


def test_dvc_plots_show_and_diff_render_every_variant(pipeline):
    repo, env = pipeline["repo"], pipeline["env"]
    out = repo / "plots_all"
    run(["dvc", "plots", "show", "-o", str(out)], repo, env)
    page = (out / "index.html").read_text()
    for variant in VARIANTS:
        for column in ("accuracy", "val_accuracy", "loss", "val_loss"):
            assert f"{variant}/history.csv::{column}" in page, (variant, column)
    for name in ("curves", "confusion", "errors"):
        assert f"reports_{name}.png" in page
    diff = repo / "plots_diff"
    run(["dvc", "plots", "diff", "HEAD", "-o", str(diff)], repo, env)
    page = (diff / "index.html").read_text()
    assert "HEAD" in page and "workspace" in page


def test_report_parent_runs_group_each_execution(pipeline):
    repo = pipeline["repo"]
    client, parents = pipeline_runs(repo)
    assert [p.info.run_name for p in parents] == ["pipeline", "pipeline"]  # repro, exp run
    assert all(p.info.status == "FINISHED" for p in parents)
    first, second = parents
    assert "dvc_exp_name" not in first.data.tags
    assert second.data.tags["dvc_exp_name"] == "drop03"
    current = variant_run_ids(repo)
    assert {v: second.data.tags[f"variant_run_id.{v}"] for v in VARIANTS} == current
    assert {"finetune_vs_dropout_test_difference", "finetune_vs_dropout_test_mcnemar_p",
            "finetune_vs_dropout_val_ci_low", "dropout_test_accuracy_ci_high"} \
        <= set(second.data.metrics)
    for parent in parents:
        assert re.fullmatch(r"[0-9a-f]{12}", parent.data.tags["data_version"])
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(REPORT_FILES)
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert all(c.data.tags["pipeline_run_id"] == parent.info.run_id for c in children)
        names = sorted(c.info.run_name for c in children)
        if parent is first:  # trained everything
            assert names == sorted(VARIANTS)
            assert {c.data.tags["variant"]: c.info.run_id for c in children}["baseline"] \
                == current["baseline"]
        else:  # re-trained only dropout and finetune; the others stay with the first
            assert names == ["dropout", "finetune"]
            assert {c.info.run_id for c in children} == {current["dropout"], current["finetune"]}
            assert all(c.data.tags.get("dvc_exp_name") == "drop03" for c in children)


def test_repro_moves_the_champion_and_an_experiment_registers_a_challenger(pipeline):
    """Each execution registers its winner (best by validation accuracy) as a new candidate
    version with its provenance; dvc repro promotes it (a copy in the production model, its
    @champion), dvc exp run gets @challenger of the candidates."""
    repo = pipeline["repo"]
    client, parents = pipeline_runs(repo)
    first, second = parents
    champion = client.get_model_version_by_alias("food101-classifier", "champion")
    challenger = client.get_model_version_by_alias("food101-classifier-candidates",
                                                   "challenger")
    assert champion.tags["candidate_version"] == first.data.tags["registered_model_version"]
    promotion = client.get_run(champion.run_id)  # the copy's files: the production experiment
    assert promotion.info.experiment_id == client.get_experiment_by_name(
        "food101-classifier-production").experiment_id
    assert str(challenger.version) == second.data.tags["registered_model_version"]
    assert first.data.tags["registered_model_alias"] == "champion"
    assert second.data.tags["registered_model_alias"] == "challenger"
    metrics = pipeline["first_metrics"]
    variant = champion.tags["variant"]
    assert metrics[variant]["best_val_accuracy"] == max(m["best_val_accuracy"]
                                                         for m in metrics.values())
    assert parents[0].data.tags["champion"] == variant
    assert json.loads(champion.tags["class_names"]) == TINY["data"]["classes"]
    assert challenger.tags["dvc_exp_name"] == "drop03" and "dvc_exp_name" not in champion.tags
    for version in (champion, challenger):
        tags = version.tags
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
        assert re.fullmatch(r"[0-9a-f]{12}", tags["data_version"])
        assert re.fullmatch(r"\[[01]\.\d{4}, [01]\.\d{4}\]", tags["val_accuracy_ci"]), tags
        assert re.fullmatch(r"\[[01]\.\d{4}, [01]\.\d{4}\]", tags["test_accuracy_ci"]), tags
        assert float(tags["val_accuracy"]) >= LEARNS
    text = (repo / "reports" / "comparison.md").read_text()  # the experiment's report
    assert (f"registered as version {challenger.version} of `food101-classifier-candidates` "
            "with the alias `@challenger`") in text
    assert f"did not move (`foodtransfer promote {challenger.version}` moves it)" in text


def test_the_champion_takes_raw_images(pipeline):
    import mlflow
    from mlflow.models import get_model_info

    repo = pipeline["repo"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    try:
        info = get_model_info("models:/food101-classifier@champion")
    finally:
        mlflow.set_tracking_uri(None)
    size = TINY["image_size"]  # raw images in: the preprocessing is inside the model
    assert info.metadata["image_size"] == size and info.signature.inputs is None
    assert [spec.name for spec in info.signature.outputs.inputs] == TINY["data"]["classes"]
    assert info.saved_input_example_info is not None


def test_predict_cli_with_the_champion(pipeline, tmp_path):
    import mlflow
    from PIL import Image

    from foodtransfer.data.images import decode_image

    repo, env = pipeline["repo"], dict(pipeline["env"])
    rng = np.random.default_rng(5)
    paths = []
    for index, shape in enumerate([(50, 40, 3), (24, 24, 3), (70, 33)]):
        path = tmp_path / f"photo{index}.{'png' if index == 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    env["MLFLOW_TRACKING_URI"] = uri
    script = str(Path(sys.executable).parent / "foodtransfer")
    result = run([script, "predict", *map(str, paths), "--json", "--top-k", "4"], repo, env)
    output = json.loads(result.stdout)
    assert output["model_uri"] == "models:/food101-classifier@champion"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(output["model_uri"])
        images = np.stack([decode_image(p, TINY["image_size"]).pixels for p in paths])
        expected = model.predict(images.astype("float32"))
    finally:
        mlflow.set_tracking_uri(None)
    for entry, path, (_, row) in zip(output["images"], paths, expected.iterrows()):
        assert entry["image"] == str(path)
        top = entry["predictions"]
        assert len(top) == 4
        assert sum(item["probability"] for item in top) == pytest.approx(1.0, abs=1e-5)
        for item in top:
            assert item["probability"] == pytest.approx(row[item["class_name"]], abs=1e-5)
    missing = subprocess.run([script, "predict", str(tmp_path / "nope.jpg")], cwd=repo,
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert "foodtransfer predict: error:" in missing.stderr and "Traceback" not in missing.stderr


# ------------------------------------------------------------------------- the browser demo
def screenshot_to(driver, path: Path) -> None:
    """Save the browser's screenshot to ``path``, and a copy into $FOODTRANSFER_SCREENSHOTS
    when set (how the docs' screenshots are taken)."""
    driver.save_screenshot(str(path))
    if os.environ.get("FOODTRANSFER_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["FOODTRANSFER_SCREENSHOTS"]) / path.name)


def test_the_demo_classifies_an_uploaded_photo_as_predict_does(pipeline, tmp_path):
    """`foodtransfer demo` in a real browser: a photo uploaded shows the top class
    `foodtransfer predict` prints for it; the second tab shows the four variants' comparison
    and the champion's mistakes."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from conftest import browser, free_port, server_process, wait_until
    from foodtransfer.data.images import ImageStore
    from foodtransfer.data.manifests import load_splits

    repo, env = pipeline["repo"], pipeline["env"]
    test = load_splits(repo / "data" / "split")["test"]
    rows = [int(np.flatnonzero(test.labels == label)[0]) for label in (0, 2)]
    photos = []
    for row in rows:
        photo = tmp_path / f"photo{row}.jpg"
        pixels = ImageStore(repo / "data/trimmed/test.npy").read([int(test.indices[row])])[0]
        Image.fromarray(pixels).resize((64, 64)).save(photo, quality=92)
        photos.append(photo)
    script = str(Path(sys.executable).parent / "foodtransfer")
    printed = json.loads(run([script, "predict", *map(str, photos), "--json", "--top-k", "1"],
                             repo, env).stdout)
    expected = [entry["predictions"][0]["class_name"] for entry in printed["images"]]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with server_process([script, "demo", "--port", str(port)], url, cwd=repo, env=env), \
            browser() as driver:
        shown = []
        for photo in photos:  # a fresh page for each photo
            driver.get(url)
            upload = wait_until(lambda: driver.find_elements(
                By.CSS_SELECTOR, "#photo input[type=file]"), what="the upload field")[0]
            upload.send_keys(str(photo))

            def top_class():
                found = driver.find_elements(
                    By.CSS_SELECTOR, "#prediction [data-testid='label-output-value']")
                return found[0].text.strip() if found else ""

            shown.append(wait_until(top_class, what=f"the top class of {photo.name}"))
            rows_shown = driver.find_elements(By.CSS_SELECTOR,
                                              "#prediction [data-testid$='-confidence-set']")
            assert len(rows_shown) == min(5, len(TINY["data"]["classes"])), len(rows_shown)
        screenshot_to(driver, tmp_path / "demo.png")
        assert shown == expected, (shown, expected)
        driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Comparison')]").click()
        table = wait_until(lambda: driver.find_element(By.ID, "comparison").text,
                           what="the comparison")
        for name in VARIANTS:
            assert name in table, table[:500]
        assert "pipeline run" in driver.find_element(By.ID, "report-source").text
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#mistakes img"),
                   what="the champion's mistakes")
        screenshot_to(driver, tmp_path / "demo-comparison.png")


# --------------------------------------------------------------------------- the MLflow UI
def test_the_mlflow_ui_opens_on_the_training_runs(pipeline):
    """`foodtransfer ui` on the project's store, read back as the browser reads it (REST):
    a model-training experiment, runs with datasets and descriptions, system metrics."""
    from conftest import free_port, http_json, server_process

    repo, env = pipeline["repo"], pipeline["env"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "foodtransfer"), "ui", "--port", str(port)]
    printed = subprocess.run([*command, "--dry-run"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout
    with server_process(command, f"{base}/health", cwd=repo, env=env) as server:
        experiment = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?"
                               "experiment_name=e2e")["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = http_json(f"{base}/api/2.0/mlflow/runs/search",
                         {"experiment_ids": [experiment["experiment_id"]],
                          "filter": "tags.run_kind = 'variant'", "max_results": 100})["runs"]
        assert {run["info"]["run_name"] for run in runs} == set(VARIANTS)
        from foodtransfer.data.manifests import data_version

        version = data_version(repo / "data" / "split")
        for run in runs:
            run_tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
            name = run["info"]["run_name"]
            note = run_tags["mlflow.note.content"]
            assert note.startswith(f"{name}: ") and "Test accuracy" in note, note
            assert re.search(r"kept epoch \d+ of \d+", note), note
            assert run_tags["device"].startswith("CPU (")
            inputs = run["inputs"]["dataset_inputs"]
            contexts = {next(t["value"] for t in item["tags"]
                             if t["key"] == "mlflow.data.context"): item["dataset"]["name"]
                        for item in inputs}
            assert contexts == {"training": f"train-{version}",
                                "validation": f"val-{version}", "test": f"test-{version}"}
            metrics = {metric["key"] for metric in run["data"]["metrics"]}
            assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"
                    } <= metrics, (name, sorted(metrics))
        # The URL it prints opens the runs table in a fresh browser (not the GenAI overview),
        # the experiment has a description, and one web worker serves it, no job runner.
        url = f"{base}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
        assert f"MLflow UI: {url} " in printed, printed
        assert tags["mlflow.note.content"].startswith("foodtransfer: ")
        import psutil

        children = [p.cmdline() for p in psutil.Process(server.pid).children(recursive=True)]
        assert sum("uvicorn" in " ".join(c) for c in children) == 1, children
        assert not any("huey" in " ".join(c) for c in children), children
        from selenium.webdriver.common.by import By

        from conftest import browser, wait_until

        def run_names():
            return [link.text for link in driver.find_elements(
                By.CSS_SELECTOR, "a[href*='/runs/'] span")]

        with browser() as driver:
            driver.get(url)
            # The table lists the pipeline runs, each with its variant runs nested: open them.
            wait_until(lambda: "pipeline" in run_names(), what="the pipeline runs")
            for expander in driver.find_elements(
                    By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"):
                expander.click()
            names = wait_until(lambda: set(VARIANTS) <= set(run_names()) and run_names(),
                               what=f"the variant runs {VARIANTS}")
            screenshot = Path(repo) / "ui-runs.png"
            screenshot_to(driver, screenshot)
        assert set(VARIANTS) <= set(names), names
        assert screenshot.stat().st_size > 10_000


# ------------------------------------------------------------- seeds, sweeps and compare
# Last in this module: the queued experiments move the champion alias to their report.
@pytest.fixture(scope="module")
def seeded(pipeline):
    """Another training seed for both dropout values, in DVC's queue (grid syntax): with the
    two executions above, two seeds per configuration; then `foodtransfer compare`."""
    repo, env = pipeline["repo"], pipeline["env"]
    # Between the two seeds, an edit to code no training stage runs (the demo): the seeds
    # still pool as one configuration.
    demo = repo / "src" / "foodtransfer" / "demo.py"
    demo.write_text(demo.read_text() + "\n# an edit no training stage sees\n")
    run(["git", "commit", "-qam", "edit the demo"], repo, env)
    run(["dvc", "exp", "run", "--queue", "-S", "seed=7", "-S", "dropout=0.3,0.6"], repo, env)
    # Queued, then the workspace's training code breaks (env's PYTHONPATH puts the
    # workspace's src/ first, as `pip install -e .` would): the queue runs its own copy.
    stage = repo / "src" / "foodtransfer" / "stages" / "dropout.py"
    queued_code = stage.read_text()
    stage.write_text(queued_code + "\nraise RuntimeError('the workspace edit ran')\n")
    try:
        # Two whole pipelines, one after the other: 900 s each at most.
        queue = run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo, env, timeout=1800)
    finally:
        stage.write_text(queued_code)
    compared = run([str(Path(sys.executable).parent / "foodtransfer"), "compare"], repo, env)
    return {**pipeline, "queue": queue, "compare": compared}


def test_queued_experiments_run_their_own_code(seeded):
    """Every queued stage ran the queue's copy of the code, and says so: its code_path is the
    copy's, its code_version the hash of the code that was queued (the workspace's now)."""
    from foodtransfer.dag import code_version

    assert "the workspace edit ran" not in seeded["queue"].stdout + seeded["queue"].stderr
    client, _, runs = mlflow_runs(seeded["repo"])
    queued = [r for r in runs if r.data.params.get("seed") == "7"]
    assert {r.info.run_name for r in queued} == set(VARIANTS)
    for run_ in queued:
        assert run_.info.status == "FINISHED" and run_.data.tags["outputs"] == "published"
        assert "/.dvc/tmp/exps/" in run_.data.tags["code_path"], run_.data.tags["code_path"]
        assert run_.data.tags["code_version"] == code_version(
            seeded["repo"], [run_.info.run_name]), run_.info.run_name


def test_queued_seeds_rerun_only_the_training_stages(seeded):
    output = seeded["queue"].stdout
    # Two experiments of seed 7: the second (another dropout) takes baseline and transfer
    # from DVC's run cache instead of training them again.
    assert output.count("Running stage 'baseline'") == 1, output
    assert "Stage 'baseline' is cached - skipping run" in output
    assert "Stage 'transfer' is cached - skipping run" in output
    ran = stages_run(output)
    assert ran == {"baseline", "transfer", "dropout", "finetune", "report"}, ran


def test_compare_aggregates_seeds_and_draws_the_sweep(seeded):
    from mlflow import MlflowClient
    from PIL import Image

    repo = seeded["repo"]
    assert "compared 4 pipeline runs in 2 configurations (swept: dropout)" in \
        seeded["compare"].stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pipeline'")
    by_config: dict[str, list] = {}
    for parent in parents:
        by_config.setdefault(parent.data.params["dropout"], []).append(parent)
    assert {d: sorted(p.data.params["seed"] for p in runs) for d, runs in by_config.items()} \
        == {"0.3": ["42", "7"], "0.6": ["42", "7"]}

    frame = pd.read_csv(repo / "reports" / "experiments.csv")
    assert set(frame["variant"]) == set(VARIANTS) and set(frame["dropout"]) == {0.3, 0.6}
    for _, row in frame.iterrows():
        runs = by_config[f"{row['dropout']:g}"]
        values = [r.data.metrics[f"{row['variant']}_test_accuracy"] for r in runs]
        assert row["seeds"] == 2
        assert row["test_accuracy_mean"] == pytest.approx(np.mean(values))
        assert row["test_accuracy_sd"] == pytest.approx(np.std(values, ddof=1))
        assert row["test_accuracy_pooled_ci_low"] <= row["test_accuracy_mean"] \
            <= row["test_accuracy_pooled_ci_high"]
    text = (repo / "reports" / "experiments.md").read_text()
    assert "The configurations differ in `dropout`" in text and "dropout=0.3" in text
    with Image.open(repo / "reports" / "experiments.png") as image:
        assert image.format == "PNG"
    (comparison,) = client.search_runs([experiment.experiment_id],
                                       "tags.run_kind = 'comparison'")
    assert comparison.info.status == "FINISHED"
    assert set(comparison.data.tags["compared_runs"].split(",")) == \
        {p.info.run_id for p in parents}
    assert {a.path for a in client.list_artifacts(comparison.info.run_id)} == \
        {"experiments.md", "experiments.csv", "experiments.png"}
    assert any(key.endswith("/finetune/test_accuracy_mean") for key in comparison.data.metrics)


def test_the_results_page_is_exactly_its_spec(seeded):
    """`foodtransfer results SPEC` draws the page from exactly the spec's configurations ×
    seeds (seed 7 here: the seed-42 runs of the same configurations are left out), under a
    header that names the spec; a configuration the store lacks is refused by name, with the
    command that runs it, and nothing is written."""
    from mlflow import MlflowClient

    from foodtransfer.resultspage import load_spec, queue_commands

    repo, env = seeded["repo"], seeded["env"]
    script = str(Path(sys.executable).parent / "foodtransfer")
    spec_path = repo / "docs" / "results" / "tiny.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"title": "Tiny", "experiment": "e2e", "seeds": [7],
            "configurations": {"sweep": {"grid": {"dropout": [0.3, 0.6]}}}}
    spec_path.write_text(yaml.safe_dump(spec))
    assert queue_commands(load_spec(spec_path))[0] == [
        "dvc", "exp", "run", "--queue", "-S", "mlflow.experiment=e2e", "-S",
        "dropout=0.3,0.6", "-S", "seed=7"]
    written = run([script, "results", "docs/results/tiny.yaml"], repo, env)
    assert "2 runs of 1 configurations × 1 seeds in 2 groups" in written.stdout, written.stdout
    page = (repo / "docs" / "results" / "tiny" / "experiments.md").read_text()
    assert page.startswith("# Tiny\n") and "[tiny.yaml](../tiny.yaml)" in page, page[:400]
    assert "dropout=0.3" in page and "dropout=0.6" in page
    frame = pd.read_csv(repo / "docs" / "results" / "tiny" / "experiments.csv")
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    seven = {p.data.params["dropout"]: p for p in client.search_runs(
        [experiment.experiment_id], "tags.run_kind = 'pipeline' and params.seed = '7'")}
    assert set(seven) == {"0.3", "0.6"}
    for _, row in frame.iterrows():  # one seed each: the seed-7 run's numbers, nothing pooled
        assert row["seeds"] == 1
        assert row["test_accuracy_mean"] == pytest.approx(
            seven[f"{row['dropout']:g}"].data.metrics[f"{row['variant']}_test_accuracy"])
    assert set(frame["variant"]) == set(VARIANTS)
    assert (repo / "docs" / "results" / "tiny" / "experiments.png").stat().st_size > 1000

    spec["configurations"]["other"] = {"set": {"dropout": 0.45}}
    spec["seeds"] = [7, 42]
    (repo / "docs" / "results" / "wider.yaml").write_text(yaml.safe_dump(spec))
    refused = subprocess.run([script, "results", "docs/results/wider.yaml"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr
    # Seed 42 of the sweep's two configurations exists (the first repro and drop03).
    assert "2 of the spec's configuration × seed pairs (other seed 7; other seed 42)" \
        in message, message
    assert "foodtransfer results docs/results/wider.yaml --run" in message
    assert not (repo / "docs" / "results" / "wider").exists()


def test_compare_refuses_an_unknown_experiment(seeded):
    script = str(Path(sys.executable).parent / "foodtransfer")
    result = subprocess.run([script, "compare", "no-such-exp"], cwd=seeded["repo"],
                            env=seeded["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown experiment 'no-such-exp'" in result.stderr
    assert "drop03" in result.stderr  # the names there are


def test_experiments_leave_the_champion_and_promote_moves_it(seeded):
    """Queued experiments register challengers; `foodtransfer promote` moves @champion,
    says what it replaces with a paired comparison on validation, and predict follows."""
    import mlflow

    repo, env = seeded["repo"], seeded["env"]
    client, parents = pipeline_runs(repo)
    versions = client.search_model_versions("name = 'food101-classifier-candidates'")
    assert len(versions) == 4  # repro, drop03, the two queued experiments
    champion = client.get_model_version_by_alias("food101-classifier", "champion")
    assert champion.tags["candidate_version"] == parents[0].data.tags[
        "registered_model_version"]
    challenger = client.get_model_version_by_alias("food101-classifier-candidates",
                                                   "challenger")
    assert int(challenger.version) == max(int(v.version) for v in versions)
    queued = [v for v in versions if v.tags.get("dvc_exp_name") not in (None, "drop03")]
    assert len(queued) == 2
    drop03 = next(v for v in versions if v.tags.get("dvc_exp_name") == "drop03")
    script = str(Path(sys.executable).parent / "foodtransfer")
    promoted = run([script, "promote", "drop03"], repo, env).stdout
    now = client.get_model_version_by_alias("food101-classifier", "champion")
    assert now.tags["candidate_version"] == str(drop03.version)
    assert (f"@champion of food101-classifier -> v{now.version}, a copy of "
            f"food101-classifier-candidates v{drop03.version}") in promoted, promoted
    assert f"replacing food101-classifier v{champion.version}" in promoted
    assert re.search(r"on the same \d+ validation images: .* McNemar p = ", promoted), promoted
    again = run([script, "promote", str(drop03.version)], repo, env).stdout
    assert "is already @champion" in again
    unknown = subprocess.run([script, "promote", "no-such-exp"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and ("no version of 'food101-classifier-candidates' "
                                        "matches") in unknown.stderr
    # predict follows the champion
    from PIL import Image

    photo = repo / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (36, 36, 3), np.uint8)).save(
        photo)
    output = json.loads(run([script, "predict", str(photo), "--json", "--top-k", "4"], repo,
                            env).stdout)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(
            f"models:/food101-classifier-candidates/{drop03.version}")
        expected = model.predict(np.asarray(Image.open(photo))[None].astype("float32"))
    finally:
        mlflow.set_tracking_uri(None)
    for item in output["images"][0]["predictions"]:
        assert item["probability"] == pytest.approx(float(expected[item["class_name"]][0]),
                                                    abs=1e-5)


# ---------------------------------------------------------------- a new variant, as documented
# Last in this module: it changes the project's code, registry and dvc.yaml.
LIGHTDROP_STAGE = '''"""Stage ``lightdrop``: the transfer head with Dropout(0.2) and no regulariser."""

from __future__ import annotations

from pathlib import Path

from foodtransfer.config import Params
from foodtransfer.results import VariantPaths
from foodtransfer.stages.transfer import train_head


def run(params: Params, trimmed: Path, split: Path, features: Path,
        outputs: VariantPaths) -> str:
    return train_head(params, "lightdrop", trimmed=trimmed, split=split, features=features,
                      outputs=outputs, dropout=0.2, l1=0.0, l2=0.0)
'''


def add_lightdrop(repo: Path) -> None:
    """docs/extending.md's four steps, in ``repo``."""
    registry = repo / "src" / "foodtransfer" / "variants.py"  # 1. register it
    text = registry.read_text()
    marker = "\n)\nNAMES"
    assert marker in text
    registry.write_text(text.replace(marker, '''
    Variant("lightdrop", "the head with a light Dropout(0.2), no regulariser", True,
            color="tab:red"),
)
NAMES'''))
    # 2. its logic and its script
    (repo / "src" / "foodtransfer" / "stages" / "lightdrop.py").write_text(LIGHTDROP_STAGE)
    script = (repo / "pipeline" / "transfer.py").read_text()
    for old, new in (("stage `transfer`", "stage `lightdrop`"),
                     ("stages/transfer.py", "stages/lightdrop.py"),
                     ("stages.transfer import run", "stages.lightdrop import run"),
                     ('run_stage("transfer"', 'run_stage("lightdrop"')):
        assert old in script, old
        script = script.replace(old, new)
    (repo / "pipeline" / "lightdrop.py").write_text(script)
    # 3. its stage in dvc.yaml, its outputs in the report's
    dvc_yaml = repo / "dvc.yaml"
    spec = yaml.safe_load(dvc_yaml.read_text())
    stage = json.dumps(spec["stages"]["transfer"])
    for folder in ("pipeline/", "metrics/", "plots/", "artifacts/", "models/"):
        stage = stage.replace(f"{folder}transfer", f"{folder}lightdrop")
    stage = json.loads(stage)
    stage["deps"].insert(stage["deps"].index("src/foodtransfer/stages/runner.py"),
                         "src/foodtransfer/stages/lightdrop.py")
    spec["stages"]["lightdrop"] = stage
    report = spec["stages"]["report"]
    report["cmd"] = report["cmd"].replace(
        "--out reports", "--metrics metrics/lightdrop.json --plots plots/lightdrop "
        "--artifacts artifacts/lightdrop --out reports")
    report["deps"] += ["metrics/lightdrop.json", "plots/lightdrop/history.csv",
                       "plots/lightdrop/predictions.csv", "artifacts/lightdrop"]
    dvc_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_a_new_variant_by_the_documented_steps(seeded):
    from mlflow import MlflowClient

    repo, env = seeded["repo"], seeded["env"]
    add_lightdrop(repo)
    ran = run(["dvc", "repro"], repo, env)  # 4. run
    assert stages_run(ran.stdout) == {"lightdrop", "report"}, ran.stdout
    metrics = json.loads((repo / "metrics" / "lightdrop.json").read_text())
    assert metrics["best_val_accuracy"] >= LEARNS and metrics["deployed_model_drift"] <= 1e-3
    text = (repo / "reports" / "comparison.md").read_text()
    assert re.search(r"^\| (\*\*)?lightdrop(\*\*)? \|", text, re.M), text
    assert "- lightdrop vs finetune:" in text  # paired with every earlier variant
    # The champion is chosen among the five: lightdrop is a candidate like the others.
    client, parents = pipeline_runs(repo)
    latest = parents[-1]
    scores = {name: latest.data.metrics[f"{name}_best_val_accuracy"]
              for name in (*VARIANTS, "lightdrop")}
    assert scores[latest.data.tags["champion"]] == max(scores.values())
    champion = client.get_model_version_by_alias("food101-classifier", "champion")
    assert champion.tags["pipeline_run_id"] == latest.info.run_id
    compared = run([str(Path(sys.executable).parent / "foodtransfer"), "compare",
                    latest.info.run_id], repo, env)
    frame = pd.read_csv(repo / "reports" / "experiments.csv")
    assert "lightdrop" in set(frame["variant"]), (compared.stdout, frame)
