"""``foodtransfer results SPEC``: a results page that regenerates from the MLflow store.

A spec (YAML, in the repository: ``docs/results/<name>.yaml``) holds everything a results page
depends on: the MLflow experiment, the ``-S`` overrides every configuration shares, the
configurations (name → overrides, optionally a stage to run up to), the seeds and the
``compare --where`` filter. ``--run`` queues every configuration × seed as a DVC experiment
and runs the queue; without it the page is drawn from the runs already in the store. The page
is ``foodtransfer compare``'s output (``experiments.md``, ``.csv``, ``.png``) under a header
that names the spec and the command, so anyone with the same photographs re-runs it and diffs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    set: dict[str, Any] = Field(default_factory=dict)  # -S overrides shared by all
    configurations: dict[str, Configuration] = Field(min_length=1)
    where: dict[str, Any] = Field(default_factory=dict)  # compare --where KEY=VALUE
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


def write_page(spec: ResultsSpec, spec_path: Path, out: Path) -> str:
    """Write ``out/experiments.{md,csv,png}`` from the store (no MLflow run is logged:
    the page is documentation, not an experiment). Returns compare's summary."""
    from foodtransfer.atomic import write_text
    from foodtransfer.compare import compare

    where = [f"{key}={_value(value)}" for key, value in spec.where.items()]
    summary = compare([], spec.experiment, out, where=where, log_run=False)
    page = out / "experiments.md"
    write_text(page, header(spec, spec_path, out) + page.read_text())
    return summary
