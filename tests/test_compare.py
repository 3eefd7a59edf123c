"""foodtransfer compare's choices on hand-made MLflow runs (no store): which runs it takes,
how it groups seeds and finds the swept param, what it refuses, and that failed or running
experiments are listed, never averaged. The end-to-end run is in test_pipeline_e2e.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from foodtransfer.compare import (CompareError, check_data_versions, experiments_frame,
                                  experiments_markdown, filter_params, group, select)

_clock = itertools.count(1)


def make_run(run_id: str, *, kind: str = "pipeline", status: str = "FINISHED",
             name: str | None = None, seed: int = 42, dropout: float = 0.6,
             data_version: str = "v1", variant: str | None = None,
             code: str = "c1") -> SimpleNamespace:
    tags = {"run_kind": kind, "data_version": data_version, "code_version": code}
    if name:
        tags["dvc_exp_name"] = name
    if variant:
        tags["variant"] = variant
    params = {"seed": str(seed), "dropout": str(dropout), "mlflow.experiment": "e",
              "backbone": "MobileNetV2"}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status, run_name=variant or kind,
                             start_time=next(_clock)),
        data=SimpleNamespace(tags=tags, params=params,
                             metrics={"dropout_test_accuracy": 0.8 + seed / 1000}))


def test_all_finished_pipeline_runs_grouped_by_config_with_the_swept_param() -> None:
    runs = [make_run("a", seed=1), make_run("b", seed=2), make_run("c", seed=1, dropout=0.3),
            make_run("d", seed=2, dropout=0.3), make_run("t1", kind="variant",
                                                         variant="dropout")]
    executions, unfinished = select(runs, [], "e")
    assert [e.run_id for e in executions] == ["a", "b", "c", "d"] and unfinished == []
    groups, swept = group(executions)
    assert swept == ["dropout"]
    assert [[e.run_id for e in g.executions] for g in groups] == [["a", "b"], ["c", "d"]]
    assert [g.label(swept) for g in groups] == ["dropout=0.6", "dropout=0.3"]


def test_runs_of_different_code_are_kept_apart_unless_pooled() -> None:
    runs = [make_run("a", seed=1), make_run("b", seed=2), make_run("c", seed=1, code="c2"),
            make_run("d", seed=2, code="c2")]
    executions, _ = select(runs, [], "e")
    assert [e.run_id for e in executions] == ["a", "b", "c", "d"]  # seed 1 twice: other code
    groups, swept = group(executions)
    assert swept == ["code_version"]
    assert [g.label(swept) for g in groups] == ["code_version=c1", "code_version=c2"]
    groups, swept = group(executions, pool_code_versions=True)
    # Pooled, each seed counts once: its latest execution (c2's), never both codes' runs.
    assert swept == [] and [[e.run_id for e in g.executions] for g in groups] == [["c", "d"]]


def test_a_run_whose_files_never_landed_is_not_compared() -> None:
    lost, pending, landed = make_run("l", seed=1), make_run("p", seed=2), make_run("ok", seed=3)
    lost.data.tags["outputs"], pending.data.tags["outputs"] = "lost", "pending"
    landed.data.tags["outputs"] = "published"
    executions, _ = select([lost, pending, landed, make_run("old", seed=4)], [], "e")
    assert [e.run_id for e in executions] == ["ok", "old"]  # old: before the tag existed


def test_one_run_per_seed_the_latest() -> None:
    runs = [make_run("old", seed=1), make_run("new", seed=1), make_run("other", seed=2)]
    executions, _ = select(runs, [], "e")
    assert [e.run_id for e in executions] == ["new", "other"]


def test_names_select_by_dvc_experiment_or_run_id() -> None:
    runs = [make_run("a", name="exp-a"), make_run("b", name="exp-b", seed=7),
            make_run("c", seed=9)]
    executions, _ = select(runs, ["exp-b", "c"], "e")
    assert [e.run_id for e in executions] == ["b", "c"]
    with pytest.raises(CompareError, match=r"unknown experiment 'nope'.*DVC experiments there: "
                                           r"exp-a, exp-b"):
        select(runs, ["nope"], "e")


def test_failed_and_running_experiments_are_listed_not_averaged() -> None:
    runs = [make_run("ok", name="good"),
            make_run("t-fail", kind="variant", variant="dropout", status="FAILED",
                     name="broken", seed=3),
            make_run("t-run", kind="variant", variant="finetune", status="RUNNING",
                     name="busy", seed=4),
            make_run("t-ok", kind="variant", variant="transfer", name="half", seed=5)]
    executions, unfinished = select(runs, [], "e")
    assert [e.run_id for e in executions] == ["ok"]
    listed = {u.name: (u.status, u.detail) for u in unfinished}
    assert listed["broken"] == ("FAILED", "dropout failed")
    assert listed["busy"] == ("RUNNING", "finetune running")
    assert listed["half"] == ("INCOMPLETE", "transfer finished (no finished report stage yet)")
    # Asked for by name, a failed experiment is listed, and not an error.
    executions, unfinished = select(runs, ["good", "broken"], "e")
    assert [e.run_id for e in executions] == ["ok"] and unfinished[0].name == "broken"
    groups, swept = group(executions)
    text = experiments_markdown("e", executions, groups, swept, [], unfinished, None)
    assert "## Not included" in text and "| broken | FAILED | dropout failed |" in text


def test_different_data_versions_are_not_pooled() -> None:
    runs = [make_run("a", seed=1), make_run("b", seed=2, data_version="v2"),
            make_run("c", seed=3, data_version="v2")]
    executions, _ = select(runs, [], "e")
    with pytest.raises(CompareError, match=r"2 data versions \(v1 \(1 run\), v2 \(2 runs\)\).*"
                                           r"--data-version"):
        check_data_versions(executions, None)
    assert [e.run_id for e in check_data_versions(executions, "v2")] == ["b", "c"]
    with pytest.raises(CompareError, match="no compared run is on data version 'v3'"):
        check_data_versions(executions, "v3")


def test_frame_has_mean_sd_and_the_swept_values() -> None:
    runs = [make_run("a", seed=1), make_run("b", seed=3)]
    executions, _ = select(runs, [], "e")
    groups, swept = group(executions)
    from foodtransfer.compare_stats import Summary

    summary = Summary(groups[0], "dropout", ["1", "3"],
                      {"test_accuracy": [0.80, 0.84], "test_macro_f1": [0.7, 0.74],
                       "best_val_accuracy": [0.9, 0.9]}, (0.78, 0.86))
    frame = experiments_frame([summary], swept)
    row = frame.iloc[0]
    assert row["seeds"] == 2 and row["test_accuracy_mean"] == pytest.approx(0.82)
    assert row["test_accuracy_sd"] == pytest.approx(0.028284, abs=1e-6)
    assert row["best_val_accuracy_sd"] == pytest.approx(0.0)
    assert (row["test_accuracy_pooled_ci_low"], row["test_accuracy_pooled_ci_high"]) == \
        (0.78, 0.86)
    text = experiments_markdown("e", executions, groups, swept, [summary], [], "R1")
    # Two seeds: the image-only interval, and the seed share said to need three.
    assert "| all runs | dropout | 2 | 0.820 ± 0.028 | n/a (< 3 seeds) | [0.780, 0.860] |" \
        in text
    assert "| all runs | dropout | 0.028 | - | n/a (< 3 seeds) |" in text
    assert isinstance(frame, pd.DataFrame)


def test_compare_without_a_store_is_one_clear_error(tmp_path, monkeypatch) -> None:
    from foodtransfer.cli import app

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["compare"])
    assert result.exit_code == 2
    assert "foodtransfer compare: error: There is no MLflow store" in result.output
    assert not (tmp_path / "mlruns").exists()  # nothing created


def test_where_keeps_the_runs_with_those_param_values() -> None:
    runs = [make_run("a", dropout=0.6), make_run("b", dropout=0.3, seed=2),
            make_run("c", dropout=0.60, seed=3)]
    executions, _ = select(runs, [], "e")
    assert [e.run_id for e in filter_params(executions, ["dropout=0.6"])] == ["a", "c"]
    assert [e.run_id for e in filter_params(executions, ["dropout=0.3", "seed=2"])] == ["b"]
    with pytest.raises(CompareError, match=r"no compared run has a param 'dropuot' \(did you "
                                           r"mean 'dropout'\?\)"):
        filter_params(executions, ["dropuot=0.6"])
    with pytest.raises(CompareError, match="is not key=value"):
        filter_params(executions, ["dropout"])
    with pytest.raises(CompareError, match="no pipeline run matches dropout=0.9"):
        filter_params(executions, ["dropout=0.9"])


def test_the_results_spec_in_the_repo_queues_each_configuration_once(tmp_path) -> None:
    from pathlib import Path

    from foodtransfer.resultspage import load_spec, queue_commands

    spec = load_spec(Path(__file__).parent.parent / "docs" / "results" / "mini8.yaml")
    commands = queue_commands(spec)
    assert len(commands) == len(spec.configurations) + 1
    assert commands[-1] == ["dvc", "exp", "run", "--run-all", "-j", "1"]
    for command in commands[:-1]:
        keys = [arg.split("=", 1)[0] for arg in command[5::2]]
        assert len(keys) == len(set(keys)), command  # one -S per param: no order question
        assert "-S" in command and "seed=1,2,3" in command
    reference = commands[0]
    assert "image_size=224" in reference and reference[-1] == "finetune"
    assert any(arg.startswith("data.classes=[cannoli,edamame,") for arg in reference)
    assert "dropout=0.2,0.4" in commands[5] and "finetune.views=2" in commands[7]


def test_a_bad_results_spec_is_one_clear_line(tmp_path) -> None:
    from foodtransfer.cli import app

    spec = tmp_path / "bad.yaml"
    spec.write_text("title: t\nexperiment: e\nseeds: []\nconfigurations: {a: {sett: {}}}\n")
    result = CliRunner().invoke(app, ["results", str(spec)])
    assert result.exit_code == 2
    assert "is not a results spec: seeds:" in result.output
    assert "configurations.a.sett: Extra inputs are not permitted" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_results_page_takes_exactly_its_configurations_and_seeds(tmp_path) -> None:
    """The spec's runs only: the latest run per configuration × seed whose params are the
    project's params with the spec's overrides; a third seed and other params are ignored; a
    target configuration reads its variant runs; a missing pair is named with the command."""
    from pathlib import Path

    import yaml

    from foodtransfer.resultspage import (ResultsSpec, ResultsSpecError, expected_params,
                                          spec_executions)

    base = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    spec = ResultsSpec.model_validate({
        "title": "t", "experiment": "e", "seeds": [1, 2], "set": {"epochs": 5},
        "configurations": {"plain": {}, "heads": {"target": "dropout",
                                                  "grid": {"dropout": [0.2, 0.4]}}}})
    expected = expected_params(spec, base)
    assert list(expected) == ["plain", "heads dropout=0.2", "heads dropout=0.4"]
    assert expected["plain"]["epochs"] == "5" and expected["plain"]["dropout"] == "0.6"
    assert expected["heads dropout=0.2"]["dropout"] == "0.2"

    def logged(run_id, label, seed, kind="pipeline", variant=None, **changed):
        run = make_run(run_id, kind=kind, seed=seed, variant=variant)
        run.data.params = {**expected[label], "seed": str(seed), **changed}
        run.data.metrics = {"test_accuracy": 0.5} if variant else {"dropout_test_accuracy": 0.5}
        return run

    runs = [logged("old", "plain", 1), logged("p1", "plain", 1), logged("p2", "plain", 2),
            logged("p3", "plain", 3),  # a third seed: not the spec's
            logged("x1", "plain", 1, epochs="6"),  # other params: not the spec's
            *[logged(f"h{v}{s}", f"heads dropout=0.{v}", s, "variant", "dropout")
              for v in (2, 4) for s in (1, 2)]]
    found = spec_executions(spec, runs, base, Path("spec.yaml"))
    assert [e.run_id for e in found] == ["p1", "p2", "h21", "h22", "h41", "h42"]
    assert found[2].metrics == {"dropout_test_accuracy": 0.5}
    assert found[2].variant_runs == {"dropout": "h21"}
    with pytest.raises(ResultsSpecError, match=r"2 of the spec's configuration × seed pairs "
                                               r"\(plain seed 2; heads dropout=0.4 seed 2\).*"
                                               r"foodtransfer results spec.yaml --run"):
        spec_executions(spec, [r for r in runs if r.info.run_id not in ("p2", "h42")], base,
                        Path("spec.yaml"))


def test_experiments_without_a_report_are_their_variant_runs() -> None:
    """A sweep whose stages stop before the report: one execution per DVC experiment, made
    of its finished variant runs (never another experiment's, never an unpublished one)."""
    from foodtransfer.compare import from_variant_runs

    mine = make_run("d1", kind="variant", variant="dropout", name="sweep-1", seed=1)
    mine.data.metrics = {"test_accuracy": 0.8, "best_val_accuracy": 0.7}
    other = make_run("d2", kind="variant", variant="dropout", name="sweep-2", dropout=0.3)
    other.data.metrics = {"test_accuracy": 0.6}
    lost = make_run("d3", kind="variant", variant="dropout", name="sweep-3")
    lost.data.tags["outputs"] = "lost"
    elsewhere = make_run("d4", kind="variant", variant="dropout", name="before-the-sweep")
    found = from_variant_runs([mine, other, lost, elsewhere], ["sweep-1", "sweep-2", "sweep-3"])
    assert [e.name for e in found] == ["sweep-1", "sweep-2"]
    assert found[0].metrics == {"dropout_test_accuracy": 0.8, "dropout_best_val_accuracy": 0.7}
    assert found[0].variant_runs == {"dropout": "d1"}
    groups, swept = group(found)
    assert swept == ["dropout"] and len(groups) == 2
