"""`foodtransfer sweep` as the first command of a fresh project, on a local Dask cluster: what
it logs outlives its temporary clones (the registered models load, the pipeline runs list
their artifacts), its stages run the clones' code, and a sweep whose targets stop before the
report compares nothing rather than a run from before the sweep."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import merge_params
from test_pipeline_e2e import TINY, make_repo, run

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# The tiny pipeline, smaller still: two whole experiments run one after the other.
SMALL = merge_params(TINY, {"epochs": 3, "baseline": {"epochs": 1},
                            "mlflow": {"experiment": "sweep", "registered_model": "swept"}})


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, standin_weights):
    repo, env = make_repo(tmp_path_factory.mktemp("sweep"), SMALL, standin_weights)
    assert not (repo / "mlruns" / "mlflow.db").exists()  # no store, no experiment yet
    # Over the head's dropout: the driver computes every stage up to the transfer head once.
    first = subprocess.run([str(BIN / "foodtransfer"), "sweep", "-S", "dropout=0.3,0.5",
                            "--workers", "1"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=1800)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "after the sweep"], repo, env)
    targeted = subprocess.run([str(BIN / "foodtransfer"), "sweep", "dropout", "-S",
                               "dropout=0.2,0.4", "--workers", "1"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1800)
    return {"repo": repo, "env": env, "first": first, "targeted": targeted}


def client_of(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


def test_a_first_sweep_keeps_every_artifact_it_logged(fresh) -> None:
    import mlflow

    first, repo = fresh["first"], fresh["repo"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "compare: compared 2 pipeline runs in 2 configurations (swept: dropout)" \
        in first.stdout, first.stdout
    client = client_of(repo)
    experiment = client.get_experiment_by_name("sweep")
    assert experiment.artifact_location == (repo / "mlruns" / "artifacts").as_uri()
    pipelines = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pipeline'")
    assert sorted(p.data.params["dropout"] for p in pipelines) == ["0.3", "0.5"]
    for pipeline in pipelines:
        listed = {a.path for a in client.list_artifacts(pipeline.info.run_id)}
        assert {"comparison.md", "run.json", "curves.png"} <= listed, listed
        assert pipeline.info.artifact_uri.startswith((repo / "mlruns" / "artifacts").as_uri())
        # The clone's code ran, and says so.
        assert "foodtransfer-sweep-" in pipeline.data.tags["code_path"]
    versions = client.search_model_versions("name = 'swept-candidates'")
    assert len(versions) == 2
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    try:
        for version in versions:
            model = mlflow.pyfunc.load_model(f"models:/swept-candidates/{version.version}")
            assert model.metadata is not None
    finally:
        mlflow.set_tracking_uri(None)


def test_a_sweep_that_stops_before_the_report_compares_its_own_runs(fresh) -> None:
    """Its experiments have no pipeline run (the report's files in the clones are the
    commit's): compare takes their own variant runs, nothing from before the sweep."""
    targeted, repo = fresh["targeted"], fresh["repo"]
    assert targeted.returncode == 0, targeted.stdout + targeted.stderr
    assert "sweep: computing download, trim, split, features once" in targeted.stdout
    assert targeted.stdout.count(": ran dropout") == 2, targeted.stdout
    assert re.search(r"compare: compared 2 experiments by their variant runs \(no report "
                     r"stage\) in 2 configurations \(swept: dropout\)", targeted.stdout), \
        targeted.stdout
    client = client_of(repo)
    experiment = client.get_experiment_by_name("sweep")
    (comparison,) = client.search_runs([experiment.experiment_id],
                                       "tags.run_kind = 'comparison'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
    names = set(re.findall(r"sweep: done (sweep-\w+-\d)", targeted.stdout))
    compared = comparison.data.tags["compared_runs"].split(",")
    assert len(compared) == 2
    for run_id in compared:
        run_ = client.get_run(run_id)
        assert run_.data.tags["variant"] == "dropout"
        assert run_.data.tags["dvc_exp_name"] in names
