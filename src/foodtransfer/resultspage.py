"""``foodtransfer results SPEC``: a results page that regenerates from the MLflow store.

A spec (YAML, in the repository: ``docs/results/<name>.yaml``) holds everything a results page
depends on: the MLflow experiment, the ``-S`` overrides every configuration shares, the
configurations (name → overrides, optionally a variant stage to run up to) and the seeds.
``--run`` queues every configuration × seed as a DVC experiment and runs the queue; without it
the page is drawn from the runs already in the store: exactly one run per configuration ×
seed (the latest whose params are the project's params.yaml with the spec's overrides),
never any other run of the experiment, and a refusal naming the missing ones. The page is
``foodtransfer compare``'s output (``experiments.md``, ``.csv``, ``.png``) under a header that
names the spec and the command, so anyone with the same photographs re-runs it and diffs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from foodtransfer.errors import UserError


class ResultsSpecError(UserError):
    """A spec file that cannot be read or does not describe a results page."""


class Configuration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, Any] = Field(default_factory=dict)  # -S overrides of this configuration
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # -S key=a,b (one run per value)
    target: str | None = None  # a stage to run up to (dvc exp run ... TARGET), else all


class ResultsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    experiment: str  # the MLflow experiment the runs log to (mlflow.experiment)
    seeds: list[int] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"each seed once: {seeds}")
        return seeds
    set: dict[str, Any] = Field(default_factory=dict)  # -S overrides shared by all
    configurations: dict[str, Configuration] = Field(min_length=1)
    prepare: list[str] = Field(default_factory=list)  # shell commands run once before --run


def load_spec(path: Path) -> ResultsSpec:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ResultsSpecError(f"cannot read the results spec {path}: {error}") from error
    try:
        return ResultsSpec.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                             for e in error.errors())
        raise ResultsSpecError(f"{path} is not a results spec: {problems}. See "
                               "docs/results/mini8.yaml for one that is.") from error


def _value(value: Any) -> str:
    """A param value as DVC's ``-S key=value`` parses it back (YAML); environment variables
    in strings (``file://$PWD/...``) are expanded."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_value(item) for item in value) + "]"
    return str(value)


def _overrides(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={_value(value)}")]


def queue_commands(spec: ResultsSpec) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of each configuration (every seed, DVC's grid
    syntax), then the one that runs the queue."""
    seeds = ",".join(str(seed) for seed in spec.seeds)
    commands = []
    for configuration in spec.configurations.values():
        values = {"mlflow.experiment": spec.experiment, **spec.set, **configuration.set}
        commands.append(["dvc", "exp", "run", "--queue", *_overrides(values),
                         *[arg for key, values in configuration.grid.items()
                           for arg in ("-S", f"{key}={','.join(map(_value, values))}")],
                         "-S", f"seed={seeds}",
                         *([configuration.target] if configuration.target else [])])
    commands.append(["dvc", "exp", "run", "--run-all", "-j", "1"])
    return commands


def header(spec: ResultsSpec, spec_path: Path, out: Path) -> str:
    link = os.path.relpath(spec_path.resolve(), out.resolve())
    return (f"# {spec.title}\n\n"
            f"Written by `foodtransfer results {spec_path}` from the MLflow experiment "
            f"`{spec.experiment}`; the runs' params, configurations and seeds are in "
            f"[{spec_path.name}]({link}). `foodtransfer results {spec_path} --run` "
            "re-runs them (DVC's queue), then writes this page again.\n\n")


def run_spec(spec: ResultsSpec, echo=print) -> None:
    for command in spec.prepare:
        echo(f"results: {command}")
        subprocess.run(["bash", "-c", command], check=True)
    for command in queue_commands(spec):
        echo("results: " + " ".join(command))
        subprocess.run(command, check=True)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        raw = raw.setdefault(section, {})
    raw[key] = os.path.expandvars(value) if isinstance(value, str) else value


def expected_params(spec: ResultsSpec, base: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{configuration label: the flat params (as MLflow logs them, ``seed`` left out) its runs
    have}: ``base`` (the project's params.yaml, as the queue starts from it) with the spec's
    overrides, one entry per configuration and grid value."""
    import copy
    import itertools

    from foodtransfer.config import flatten, parse_params

    expected = {}
    for name, configuration in spec.configurations.items():
        keys = list(configuration.grid)
        for values in itertools.product(*configuration.grid.values()) if keys else [()]:
            raw = copy.deepcopy(base)
            for key, value in {"mlflow.experiment": spec.experiment, **spec.set,
                               **configuration.set, **dict(zip(keys, values))}.items():
                _set(raw, key, value)
            label = name + "".join(f" {key}={_value(value)}" for key, value in zip(keys, values))
            flat = flatten(parse_params(raw))
            expected[label] = {key: "null" if value is None else str(value)
                               for key, value in flat.items() if key != "seed"}
    return expected


def _matches(params: dict[str, str], expected: dict[str, str]) -> bool:
    from foodtransfer.compare import _same_value

    return all(_same_value(value, params.get(key)) for key, value in expected.items())


def spec_executions(spec: ResultsSpec, runs: list, base: dict[str, Any], spec_path: Path
                    ) -> list:
    """The executions of exactly the spec's configurations × seeds, the latest finished one of
    each; a ResultsSpecError names the ones missing and the command that makes them. A
    configuration with a ``target`` that is a variant stage is read from that variant's runs
    (it has no pipeline run); the others from their pipeline runs."""
    from foodtransfer.compare import _execution
    from foodtransfer.tracking.runs import OUTPUTS_TAG, PUBLISHED
    from foodtransfer.variants import NAMES

    finished = [run for run in runs if run.info.status == "FINISHED"
                and run.data.tags.get(OUTPUTS_TAG, PUBLISHED) == PUBLISHED]
    found, missing, mixed = [], [], []
    expected_by_label = expected_params(spec, base)
    seen: dict[tuple, str] = {}
    for label, expected in expected_by_label.items():
        target = spec.configurations[label.split(" ")[0]].target
        same = seen.setdefault((target, tuple(sorted(expected.items()))), label)
        if same != label:
            raise ResultsSpecError(f"configurations {same!r} and {label!r} have the same "
                                   "params: their runs would count twice. Remove one.")
    for label, expected in expected_by_label.items():
        target = spec.configurations[label.split(" ")[0]].target
        if target and target not in NAMES:
            raise ResultsSpecError(f"configuration {label.split(' ')[0]!r}: target {target!r} "
                                   f"is not a variant stage ({', '.join(NAMES)}): its runs "
                                   "would have no metrics to show.")
        kind, variant = ("variant", target) if target else ("pipeline", None)
        candidates = [run for run in finished if run.data.tags.get("run_kind") == kind
                      and (variant is None or run.data.tags.get("variant") == variant)
                      and _matches(run.data.params, expected)]
        versions = set()
        for seed in spec.seeds:
            mine = [run for run in candidates if run.data.params.get("seed") == str(seed)]
            if not mine:
                missing.append(f"{label} seed {seed}")
                continue
            latest = max(mine, key=lambda run: run.info.start_time or 0)
            versions.add(latest.data.tags.get("code_version"))
            execution = _execution(latest)
            if variant is not None:  # a variant run stands for an execution of that variant
                execution.metrics = {f"{variant}_{key}": value
                                     for key, value in latest.data.metrics.items()}
                execution.tags = {**execution.tags, f"variant_run_id.{variant}": execution.run_id}
            found.append(execution)
        if len(versions) > 1:
            mixed.append(label)
    if missing:
        raise ResultsSpecError(
            f"the store has no finished run of {len(missing)} of the spec's configuration × "
            f"seed pairs ({'; '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}), "
            "with the params of this project's params.yaml and the spec's overrides. Run "
            f"them: foodtransfer results {spec_path} --run")
    if mixed:
        raise ResultsSpecError(
            f"the latest runs of {', '.join(mixed)} come from different training code (tag "
            "code_version): their seeds would not be one configuration. Run them again on "
            f"one code: foodtransfer results {spec_path} --run")
    return found


def write_page(spec: ResultsSpec, spec_path: Path, out: Path,
               params_path: Path = Path("params.yaml")) -> str:
    """Write ``out/experiments.{md,csv,png}`` from exactly the spec's runs in the store (no
    MLflow run is logged: the page is documentation, not an experiment). Returns a summary."""
    import mlflow

    from foodtransfer.atomic import write_text
    from foodtransfer.compare import _all_runs, write_comparison
    from foodtransfer.tracking.store import connect_existing

    try:
        base = yaml.safe_load(params_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ResultsSpecError(f"cannot read {params_path} (the params the spec's overrides "
                               f"apply to): {error}") from error
    experiment_id = connect_existing(spec.experiment)
    client = mlflow.MlflowClient()
    executions = spec_executions(spec, _all_runs(client, experiment_id), base, spec_path)
    # Configurations may differ in their data (other classes: other test sets); they are
    # compared only where their test images are the same.
    groups, swept, _, _ = write_comparison(client, executions, [], spec.experiment, out,
                                        log_run=False)
    page = out / "experiments.md"
    write_text(page, header(spec, spec_path, out) + page.read_text())
    return (f"{len(executions)} runs of {len(spec.configurations)} configurations × "
            f"{len(spec.seeds)} seeds in {len(groups)} groups; wrote {page}")
