"""The download, trim and split stage scripts (pipeline/*.py), run through Typer's CliRunner
on a tiny generated sample: exit codes, summary lines, and clean failures on bad params."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import REPO_ROOT

CLASSES = ["pizza", "sushi", "tacos"]
# pizza (class 0) gets an empty and a truncated train file: 8 listed, 6 usable.
SAMPLE_PARAMS = {
    "image_size": 16,
    "features": {"crop": 1.0},  # no crop of 16 px images (the default would leave 14)
    "data": {
        "seed": 3,
        "source": "sample",
        "classes": CLASSES,
        "samples_per_class": 6,
        "test_per_class": 2,
        "val_fraction": 0.5,
        "sample": {"train_per_class": 8, "test_per_class": 2, "min_side": 16, "max_side": 32},
    },
}


def load_stage(name: str) -> ModuleType:
    path = REPO_ROOT / "pipeline" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stages() -> dict[str, ModuleType]:
    return {name: load_stage(name) for name in ("download", "trim", "split")}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """run_stage reconfigures the root logger onto CliRunner's stderr; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(module: ModuleType, *args: str | Path):
    result = CliRunner().invoke(module.app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_download_trim_split_on_the_sample(stages, write_params, tmp_path: Path) -> None:
    params = write_params(SAMPLE_PARAMS)
    raw, cache = tmp_path / "raw", tmp_path / "downloads"
    trimmed, split_dir = tmp_path / "trimmed", tmp_path / "split"
    metrics = tmp_path / "metrics" / "split.json"

    result = invoke(stages["download"], "--params", params, "--out", raw, "--cache", cache)
    assert result.exit_code == 0, result.output
    archive = cache / "food-101-sample-seed3.tar.gz"
    assert re.search(r"^download: extracted 30 images of 3 classes and meta/ from generated "
                     rf"sample {re.escape(str(archive))} into {re.escape(str(raw))} "
                     r"\[\d+\.\ds\]$", result.stdout, re.M), result.output
    assert sorted(p.name for p in (raw / "food-101" / "images").iterdir()) == CLASSES

    result = invoke(stages["trim"], "--params", params, "--raw", raw, "--out", trimmed)
    assert result.exit_code == 0, result.output
    assert re.search(r"^trim: decoded 18 train \+ 6 test images of 3 classes at 16px, skipped 2 "
                     rf"unreadable \(see {re.escape(str(trimmed))}/report.csv\) \[\d+\.\ds\]$",
                     result.stdout, re.M), result.output
    assert len(pd.read_csv(trimmed / "train.csv")) == 18

    result = invoke(stages["split"], "--params", params, "--trimmed", trimmed,
                    "--out", split_dir, "--metrics", metrics)
    assert result.exit_code == 0, result.output
    match = re.search(r"^split: train 9, val 9, test 6 images; data version ([0-9a-f]{12}); "
                      rf"manifests in {re.escape(str(split_dir))} \[\d+\.\ds\]$",
                      result.stdout, re.M)
    assert match, result.output
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        digest.update((split_dir / f"{name}.csv").read_bytes())
    assert match.group(1) == digest.hexdigest()[:12]
    summary = json.loads(metrics.read_text())
    assert summary["train_images"] == 9 and summary["val_images"] == 9
    assert "per_class" not in summary
    counts = json.loads((split_dir / "counts.json").read_text())
    assert counts["val"] == {"pizza": 3, "sushi": 3, "tacos": 3}


def test_all_classes_on_the_sample_is_the_full_food101_shape(stages, write_params,
                                                              tmp_path: Path) -> None:
    """`data.classes=all` + `samples_per_class=all` run offline with all 101 classes."""
    from foodtransfer.data import food101

    params = write_params({**SAMPLE_PARAMS, "data": {
        **SAMPLE_PARAMS["data"], "classes": "all", "samples_per_class": "all",
        "test_per_class": "all", "allow_fewer": True,
        "sample": {"train_per_class": 3, "test_per_class": 1, "min_side": 16, "max_side": 16}}})
    raw, trimmed = tmp_path / "raw", tmp_path / "trimmed"
    result = invoke(stages["download"], "--params", params, "--out", raw,
                    "--cache", tmp_path / "downloads")
    assert result.exit_code == 0, result.output
    assert "extracted 404 images of 101 classes" in result.stdout
    result = invoke(stages["trim"], "--params", params, "--raw", raw, "--out", trimmed)
    assert result.exit_code == 0, result.output
    assert json.loads((trimmed / "classes.json").read_text()) == list(food101.CLASSES)
    # 3 train images per class, minus the sample's bad files that cannot be decoded
    train = pd.read_csv(trimmed / "train.csv")
    assert train["class_name"].nunique() == 101 and 290 <= len(train) <= 303


def test_download_with_a_file_url_and_wrong_md5(stages, write_params, tmp_path: Path) -> None:
    from foodtransfer.config import SampleConfig
    from foodtransfer.data.sample import build_sample_archive

    archive = tmp_path / "food-101.tar.gz"
    config = SampleConfig(train_per_class=2, test_per_class=1, min_side=16, max_side=16)
    build_sample_archive(archive, ["pizza", "sushi"], config, 0, show_progress=False)
    params = write_params({"data": {"url": archive.as_uri(), "md5": "0" * 32,
                                    "classes": ["pizza", "sushi"]}})
    out = tmp_path / "raw"
    result = invoke(stages["download"], "--params", params, "--out", out,
                    "--cache", tmp_path / "downloads")
    assert result.exit_code == 2
    assert "download: error: Checksum mismatch" in result.stderr
    assert "0" * 32 in result.stderr
    assert not out.exists()  # extraction never started
    assert archive.exists()


@pytest.mark.parametrize("stage", ["download", "trim", "split"])
def test_a_typo_in_params_exits_2_before_any_work(stages, write_params, tmp_path: Path,
                                                  stage: str) -> None:
    params = write_params({**SAMPLE_PARAMS, "dropuot": 0.5})
    out = tmp_path / "out"
    extra = {
        "download": ["--out", out, "--cache", tmp_path / "downloads"],
        "trim": ["--raw", tmp_path / "raw", "--out", out],
        "split": ["--trimmed", tmp_path / "trimmed", "--out", out,
                  "--metrics", tmp_path / "metrics" / "split.json"],
    }[stage]
    result = invoke(stages[stage], "--params", params, *extra)
    assert result.exit_code == 2, result.output
    assert f"{stage}: error: params: unknown key 'dropuot'. Did you mean 'dropout'?" in \
        result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""  # no summary line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing created


def test_a_bad_value_names_key_and_range(stages, write_params, tmp_path: Path) -> None:
    params = write_params({**SAMPLE_PARAMS,
                           "data": {**SAMPLE_PARAMS["data"], "val_fraction": 1.5}})
    result = invoke(stages["download"], "--params", params, "--out", tmp_path / "raw",
                    "--cache", tmp_path / "downloads")
    assert result.exit_code == 2
    assert "data.val_fraction = 1.5 is out of range: must be > 0 and < 1" in result.stderr
    assert not (tmp_path / "raw").exists() and not (tmp_path / "downloads").exists()


def test_a_missing_params_file(stages, tmp_path: Path) -> None:
    result = invoke(stages["trim"], "--params", tmp_path / "nope.yaml", "--raw", tmp_path,
                    "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "trim: error: params:" in result.stderr and "not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_path_option_is_a_usage_error(stages, write_params, tmp_path: Path) -> None:
    """Paths come from dvc.yaml only: a stage script run without them says which is missing."""
    result = invoke(stages["trim"], "--params", write_params(SAMPLE_PARAMS), "--raw",
                    tmp_path / "raw")
    assert result.exit_code == 2
    assert "Missing option '--out'" in result.output


def test_trim_on_a_missing_download_output(stages, write_params, tmp_path: Path) -> None:
    params = write_params(SAMPLE_PARAMS)
    result = invoke(stages["trim"], "--params", params, "--raw", tmp_path / "raw",
                    "--out", tmp_path / "trimmed")
    assert result.exit_code == 2
    assert "trim: error:" in result.stderr and "dvc repro download" in result.stderr
    assert not (tmp_path / "trimmed").exists()
