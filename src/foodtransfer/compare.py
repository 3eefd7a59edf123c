"""``foodtransfer compare``: aggregate pipeline executions (seeds, sweeps) from MLflow.

Every pipeline execution leaves a parent MLflow run ``pipeline`` (the report stage) with the
full params, the data version, each variant's metrics and the ids of its variant runs. Compare
reads those runs, groups them by their params except ``seed`` (one group per configuration;
one run per seed in it, the latest), and gives per group and variant the mean ± standard
deviation over seeds, an image-only and a seeds + images 95 % interval, and each
configuration's difference from a reference (:mod:`foodtransfer.compare_stats`). When the groups differ in a param (a sweep: ``dvc exp run --queue -S
dropout=0.2,0.4,0.6``), it draws the metric against that param, one line per variant.

It writes ``experiments.md``, ``experiments.csv`` and ``experiments.png`` and logs them as an
MLflow run ``comparison`` (tag ``run_kind=comparison``) that names the compared runs. Runs
that failed or are still running are listed as such, never averaged.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from foodtransfer import variants
from foodtransfer.compare_stats import (comparison_metrics, difference_metrics, differences,
                                        experiments_frame, summarise)
from foodtransfer.errors import UserError
from foodtransfer.markdown import experiments_markdown
from foodtransfer.tracking.runs import OUTPUTS_TAG, PUBLISHED

log = logging.getLogger(__name__)

VARIANTS = variants.NAMES
GROUPING_IGNORES = ("seed", "mlflow.")  # params that do not make another configuration
# Runs of different code are another configuration too (a pseudo-param in the grouping key),
# unless the user pools them explicitly (--pool-code-versions).
CODE_VERSION_TAG = "code_version"
OUTPUT_FILES = ("experiments.md", "experiments.csv", "experiments.png")
COMPARISON_RUN_NAME = "comparison"


class CompareError(UserError):
    """Nothing to compare, an unknown name, or runs that must not be pooled."""


@dataclass
class Execution:
    """One pipeline execution: its parent MLflow run."""

    run_id: str
    name: str  # the DVC experiment name, or the run id when DVC did not name it
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int

    @property
    def seed(self) -> str:
        return self.params.get("seed", "?")

    @property
    def data_version(self) -> str:
        return self.tags.get("data_version", "unknown")

    @property
    def code_version(self) -> str:
        return self.tags.get(CODE_VERSION_TAG, "unknown")

    @property
    def variant_runs(self) -> dict[str, str]:
        prefix = "variant_run_id."
        return {key[len(prefix):]: value for key, value in self.tags.items()
                if key.startswith(prefix)}


@dataclass
class Unfinished:
    """A run that is not part of the comparison, and why."""

    name: str
    status: str
    detail: str


@dataclass
class Group:
    """The executions of one configuration (params equal but for the seed)."""

    key: tuple[tuple[str, str], ...]
    executions: list[Execution] = field(default_factory=list)

    def label(self, swept: list[str]) -> str:
        values = dict(self.key)
        return ", ".join(f"{name}={values.get(name, '-')}" for name in swept) or "all runs"


# ------------------------------------------------------------------------------- reading
def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _execution(run) -> Execution:
    tags = run.data.tags
    return Execution(run.info.run_id, tags.get("dvc_exp_name") or run.info.run_id,
                     dict(run.data.params), dict(run.data.metrics), dict(tags),
                     run.info.start_time or 0)


def from_variant_runs(runs: list, names: list[str]) -> list[Execution]:
    """One execution per DVC experiment of ``names`` made of its finished variant runs: an
    experiment whose stages stopped before the report (``foodtransfer sweep ... dropout``)
    has no pipeline run. Its metrics are the variants' (``dropout_test_accuracy``...)."""
    found: dict[str, Execution] = {}
    for run in sorted(runs, key=lambda run: run.info.start_time or 0):
        tags, name, variant = run.data.tags, run.data.tags.get("dvc_exp_name"), \
            run.data.tags.get("variant")
        if (name not in names or not variant or tags.get("run_kind") != "variant"
                or run.info.status != "FINISHED"
                or tags.get(OUTPUTS_TAG, PUBLISHED) != PUBLISHED):
            continue
        execution = found.setdefault(name, _execution(run))
        execution.metrics.update({f"{variant}_{key}": value
                                  for key, value in run.data.metrics.items()})
        execution.tags[f"variant_run_id.{variant}"] = run.info.run_id
    for execution in found.values():  # only the variants' own metrics, prefixed
        execution.metrics = {key: value for key, value in execution.metrics.items()
                             if key.split("_", 1)[0] in VARIANTS}
    return list(found.values())


def select(runs: list, names: list[str], experiment: str
           ) -> tuple[list[Execution], list[Unfinished]]:
    """The finished pipeline executions to compare (all, or those ``names`` name: DVC
    experiment names or pipeline run ids) and the unfinished ones that were asked for (or,
    by default, every experiment with a failed or running run)."""
    pipelines = [run for run in runs if run.data.tags.get("run_kind") == "pipeline"]
    # Finished, and its files landed (runs older than the outputs tag count as landed).
    finished = [run for run in pipelines if run.info.status == "FINISHED"
                and run.data.tags.get(OUTPUTS_TAG, PUBLISHED) == PUBLISHED]
    trainings = [run for run in runs if run.data.tags.get("variant")
                 and run.data.tags.get("run_kind") != "pipeline"]
    unfinished: list[Unfinished] = []
    if names:
        chosen = []
        for name in names:
            by_id = [run for run in finished if run.info.run_id == name]
            by_name = [run for run in finished if run.data.tags.get("dvc_exp_name") == name]
            if by_id or by_name:
                chosen.append((by_id or by_name)[-1])  # the latest report of that experiment
                continue
            stuck = [run for run in pipelines + trainings
                     if name in (run.info.run_id, run.data.tags.get("dvc_exp_name"))]
            if stuck:
                unfinished.append(_unfinished(name, stuck))
                continue
            known = sorted({run.data.tags.get("dvc_exp_name") for run in finished} - {None})
            raise CompareError(
                f"unknown experiment {name!r}: no DVC experiment of that name and no pipeline "
                f"run with that id in the MLflow experiment {experiment!r} (DVC experiments "
                f"there: {', '.join(known) or 'none'}; 'dvc exp show' lists yours). An "
                "experiment that is still queued has no runs yet.")
    else:
        chosen = finished
        # DVC experiments without a finished report, and anything still running. (A failed
        # run of the workspace's own `dvc repro` is not listed: a later repro retried it.)
        done = {run.data.tags.get("dvc_exp_name") for run in finished}
        stuck_by_name: dict[str, list] = defaultdict(list)
        for run in pipelines + trainings:
            name = run.data.tags.get("dvc_exp_name")
            if run.info.status == "RUNNING" or (name and name not in done):
                stuck_by_name[name or run.info.run_id].append(run)
        unfinished = [_unfinished(name, stuck) for name, stuck in stuck_by_name.items()]
    executions = _deduplicate([_execution(run) for run in chosen])
    return executions, unfinished


def _unfinished(name: str, runs: list) -> Unfinished:
    statuses = sorted({run.info.status for run in runs if run.info.status != "FINISHED"}) or [
        "INCOMPLETE"]
    detail = ", ".join(f"{run.info.run_name} {run.info.status.lower()}" for run in runs)
    if all(run.info.status == "FINISHED" for run in runs):
        detail += " (no finished report stage yet)"
    return Unfinished(name, "/".join(statuses), detail)


def _deduplicate(executions: list[Execution]) -> list[Execution]:
    """One execution per configuration and seed: the latest (a report re-run on the same
    variant runs, or a forced re-run, is not another seed)."""
    latest: dict[tuple, Execution] = {}
    for execution in sorted(executions, key=lambda e: e.start_time):
        latest[(_config_key(execution), execution.seed)] = execution
    return sorted(latest.values(), key=lambda e: e.start_time)


def _config_key(execution: Execution, pool_code_versions: bool = False
                ) -> tuple[tuple[str, str], ...]:
    values = {key: value for key, value in execution.params.items()
              if not key.startswith(GROUPING_IGNORES)}
    if not pool_code_versions:
        values[CODE_VERSION_TAG] = execution.code_version
    return tuple(sorted(values.items()))


def group(executions: list[Execution], pool_code_versions: bool = False
          ) -> tuple[list[Group], list[str]]:
    """The configurations (in order of first run) and the params that differ between them.
    Runs of different code (tag ``code_version``) are different configurations, and
    ``code_version`` is then among the differing "params", unless ``pool_code_versions``."""
    if pool_code_versions:  # one seed counts once: the latest execution of it, any code
        latest = {(_config_key(e, True), e.seed): e
                  for e in sorted(executions, key=lambda e: e.start_time)}
        executions = sorted(latest.values(), key=lambda e: e.start_time)
    groups: dict[tuple, Group] = {}
    for execution in executions:
        key = _config_key(execution, pool_code_versions)
        groups.setdefault(key, Group(key)).executions.append(execution)
    keys = [dict(g.key) for g in groups.values()]
    names = sorted({name for key in keys for name in key})
    swept = [name for name in names if len({key.get(name) for key in keys}) > 1]
    return list(groups.values()), swept


def _same_value(given: str, logged: str | None) -> bool:
    if logged is None:
        return False
    try:
        return float(given) == float(logged)
    except ValueError:
        return given == logged


def filter_params(executions: list[Execution], where: list[str]) -> list[Execution]:
    """The executions whose params match every ``key=value`` of ``where`` (numbers compare
    as numbers: 0.6 matches 0.60)."""
    for condition in where:
        key, sign, value = condition.partition("=")
        if not sign or not key:
            raise CompareError(f"--where {condition!r} is not key=value (e.g. --where "
                               "features.views=2).")
        known = {name for e in executions for name in e.params}
        if executions and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise CompareError(f"--where {condition!r}: no compared run has a param {key!r}"
                               + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
        executions = [e for e in executions if _same_value(value, e.params.get(key))]
    if not executions:
        raise CompareError(f"no pipeline run matches {' and '.join(where)}.")
    return executions


def check_data_versions(executions: list[Execution], data_version: str | None
                        ) -> list[Execution]:
    if data_version is not None:
        kept = [e for e in executions if e.data_version.startswith(data_version)]
        if not kept:
            raise CompareError(f"no compared run is on data version {data_version!r} (theirs: "
                               f"{', '.join(sorted({e.data_version for e in executions}))}).")
        return kept
    versions = defaultdict(list)
    for execution in executions:
        versions[execution.data_version].append(execution)
    if len(versions) > 1:
        listed = ", ".join(f"{version} ({len(runs)} run{'s' * (len(runs) > 1)})"
                           for version, runs in versions.items())
        raise CompareError(
            f"the runs are on {len(versions)} data versions ({listed}): their test sets differ, "
            "so they are not pooled. Compare one with --data-version <version>, or name the "
            "experiments to compare.")
    return executions


def reference_group(groups: list[Group], swept: list[str], against: str | None) -> Group:
    """The group others are compared with: the first, or the one ``against`` names
    (``key=value[,key=value]`` of the swept params, or the label experiments.md prints)."""
    if against is None:
        return groups[0]
    wanted = dict(part.strip().split("=", 1) for part in against.split(",") if "=" in part)
    for entry in groups:
        values = dict(entry.key)
        if entry.label(swept) == against or (wanted and all(
                _same_value(value, values.get(key)) for key, value in wanted.items())):
            return entry
    raise CompareError(f"--against {against!r} names none of the configurations: "
                       f"{'; '.join(g.label(swept) for g in groups)}.")


# --------------------------------------------------------------------------------- entry
def write_comparison(client, executions: list[Execution], unfinished: list[Unfinished],
                     experiment: str, out: Path, *, log_run: bool = True,
                     pool_code_versions: bool = False, against: str | None = None
                     ) -> tuple[list[Group], list[str], str | None, str]:
    """Group ``executions``, summarise them and write ``out/experiments.{md,csv,png}``, logged
    as a ``comparison`` run when ``log_run``. Returns the groups, the swept params, the
    comparison run's id and the text of experiments.md."""
    from foodtransfer import plots
    from foodtransfer.atomic import write_text
    from foodtransfer.tracking.runs import NOTE_TAG, tracked_run

    groups, swept = group(executions, pool_code_versions)
    reference = reference_group(groups, swept, against)
    with tempfile.TemporaryDirectory() as cache:
        summaries = summarise(client, groups, Path(cache))
    found = differences(summaries, groups, reference)
    frame = experiments_frame(summaries, swept)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "experiments.png"
    if swept:
        plots.sweep_figure(frame, swept, figure, colors=variants.COLORS)
    elif figure.exists():
        figure.unlink()  # an earlier sweep's figure would not match this comparison
    write_text(out / "experiments.csv", frame.to_csv(index=False))
    run_id = None
    if log_run:
        tags = {"compared_runs": ",".join(e.run_id for e in executions)[:5000],
                "data_version": ",".join(sorted({e.data_version for e in executions})),
                "swept_params": ",".join(swept) or "none"}
        with tracked_run(experiment, COMPARISON_RUN_NAME, "comparison",
                         {"swept": ",".join(swept) or "none", "runs": len(executions)},
                         tags) as run:
            run_id = run.run_id
            text = experiments_markdown(experiment, executions, groups, swept, summaries,
                                        unfinished, run_id, found)
            write_text(out / "experiments.md", text)
            run.log_metrics({**comparison_metrics(frame, swept),
                             **difference_metrics(found, swept)})
            for name in OUTPUT_FILES:
                if (out / name).exists():
                    run.log_artifact(out / name)
            run.set_tags({NOTE_TAG: text[:7900]})
    else:
        text = experiments_markdown(experiment, executions, groups, swept, summaries,
                                    unfinished, None, found)
        write_text(out / "experiments.md", text)
    return groups, swept, run_id, text


def compare_without_report(names: list[str], experiment: str, out: Path
                           ) -> tuple[str, str]:
    """Compare the DVC experiments ``names`` by their variant runs (their stages stopped
    before the report); as :func:`compare` otherwise."""
    import mlflow

    from foodtransfer.tracking.store import connect_existing

    experiment_id = connect_existing(experiment)
    client = mlflow.MlflowClient()
    executions = from_variant_runs(_all_runs(client, experiment_id), names)
    if not executions:
        raise CompareError(f"no finished variant run of the experiments {', '.join(names)} "
                           f"in the MLflow experiment {experiment!r}.")
    executions = check_data_versions(executions, None)
    groups, swept, run_id, text = write_comparison(client, executions, [], experiment, out)
    return (f"compared {len(executions)} experiments by their variant runs (no report stage) "
            f"in {len(groups)} configuration{'s' * (len(groups) != 1)}"
            + (f" (swept: {', '.join(swept)})" if swept else "")
            + f"; wrote {out / 'experiments.md'}; MLflow run {run_id}"), text


def compare(names: list[str], experiment: str, out: Path, data_version: str | None = None,
            where: list[str] | None = None, log_run: bool = True,
            pool_code_versions: bool = False, against: str | None = None
            ) -> tuple[str, str]:
    """Compare the pipeline executions ``names`` (all when empty) of ``experiment`` whose
    params match ``where`` (``key=value``); write ``out/experiments.{md,csv,png}`` and log
    them as a ``comparison`` run. Returns a one-line summary and experiments.md's text."""
    import mlflow

    from foodtransfer.tracking.store import connect_existing

    experiment_id = connect_existing(experiment)
    client = mlflow.MlflowClient()
    executions, unfinished = select(_all_runs(client, experiment_id), names, experiment)
    if not executions:
        detail = (f"; not finished: {', '.join(f'{u.name} ({u.status})' for u in unfinished)}"
                  if unfinished else "")
        raise CompareError(f"no finished pipeline run to compare in the MLflow experiment "
                           f"{experiment!r}{detail}: run 'dvc repro' or 'dvc exp run' first.")
    if where:
        executions = filter_params(executions, where)
    executions = check_data_versions(executions, data_version)
    groups, swept, run_id, text = write_comparison(client, executions, unfinished,
                                                   experiment, out,
                                             log_run=log_run,
                                             pool_code_versions=pool_code_versions,
                                             against=against)
    return (f"compared {len(executions)} pipeline runs in {len(groups)} configuration"
            f"{'s' * (len(groups) != 1)}" + (f" (swept: {', '.join(swept)})" if swept else "")
            + (f"; not included: {len(unfinished)} unfinished" if unfinished else "")
            + f"; wrote {out / 'experiments.md'}"
            + (f"; MLflow run {run_id}" if run_id else "")), text
