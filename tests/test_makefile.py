"""`make install` picks the TensorFlow build for the machine: tensorflow[and-cuda] when
`nvidia-smi -L` lists a GPU (a stand-in `nvidia-smi` on PATH here), tensorflow-cpu otherwise,
`GPU=0|1` overriding; the venv stamp records the choice, so another choice re-installs.
Checked with `make -n` / `make -q` in an empty folder: nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

GPU_LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f1c2a4e)"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def fake_nvidia_smi(bin_dir: Path, output: str | None) -> None:
    """An `nvidia-smi` that lists ``output``, or fails as on a machine without a driver."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + (f"echo '{output}'\n" if output else
                                       "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"))
    script.chmod(0o755)


def make(folder: Path, *args: str, gpu_listing: str | None) -> subprocess.CompletedProcess:
    fake_nvidia_smi(folder / "fakebin", gpu_listing)
    env = {**os.environ, "PATH": f"{folder / 'fakebin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GPU", None)
    env.pop("MAKEFLAGS", None)
    return subprocess.run(["make", "-f", str(REPO_ROOT / "Makefile"), "-C", str(folder), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_visible_gpu_installs_the_cuda_build(folder: Path) -> None:
    result = make(folder, "-n", "install", gpu_listing=GPU_LISTING)
    assert result.returncode == 0, result.stderr
    assert "pip install --quiet -e '.[dev,gpu,onnx,demo,sweep,team]'" in result.stdout
    assert "TensorFlow for the GPU: tensorflow[and-cuda] (GPU=1" in result.stdout
    assert "touch .venv/.installed-gpu" in result.stdout


def test_no_gpu_installs_the_cpu_build(folder: Path) -> None:
    for listing in (None, "No devices were found"):
        result = make(folder, "-n", "install", gpu_listing=listing)
        assert result.returncode == 0, result.stderr
        assert "pip install --quiet -e '.[dev,cpu,onnx,demo,sweep,team]'" in result.stdout, listing
        assert "TensorFlow for the CPU: tensorflow-cpu (GPU=0" in result.stdout


def test_gpu_0_or_1_overrides_the_detection(folder: Path) -> None:
    assert "'.[dev,cpu,onnx,demo,sweep,team]'" in make(folder, "-n", "install", "GPU=0",
                                  gpu_listing=GPU_LISTING).stdout
    assert "'.[dev,gpu,onnx,demo,sweep,team]'" in make(folder, "-n", "install", "GPU=1", gpu_listing=None).stdout
    result = make(folder, "-n", "install", "GPU=yes", gpu_listing=None)
    assert result.returncode != 0 and "GPU=yes: use GPU=1" in result.stderr


def test_the_stamp_records_the_choice_and_a_switch_reinstalls(folder: Path) -> None:
    venv = folder / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed-cpu").touch()
    os.utime(folder / "pyproject.toml", (1, 1))  # older than the stamp
    # The same choice: up to date, nothing to do.
    assert make(folder, "-q", "install", gpu_listing=None).returncode == 0
    # A GPU appears: out of date; the recipe removes the CPU build before installing.
    assert make(folder, "-q", "install", gpu_listing=GPU_LISTING).returncode == 1
    recipe = make(folder, "-n", "install", gpu_listing=GPU_LISTING).stdout
    assert "pip uninstall --quiet -y tensorflow tensorflow-cpu" in recipe
    assert recipe.index("uninstall") < recipe.index("'.[dev,gpu,onnx,demo,sweep,team]'")


def test_the_switch_step_runs(folder: Path) -> None:
    """The shell of the switch step itself, with a stand-in pip: it removes the other build
    and the old stamp only when the stamp of this choice is missing."""
    venv = folder / ".venv"
    (venv / "bin").mkdir(parents=True)
    log = folder / "pip.log"
    pip = venv / "bin" / "python"
    pip.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    pip.chmod(0o755)
    (venv / ".installed-cpu").touch()
    result = make(folder, "install", gpu_listing=GPU_LISTING)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert "-m pip uninstall --quiet -y tensorflow tensorflow-cpu" in calls
    assert calls[-1] == "-m pip install --quiet -e .[dev,gpu,onnx,demo,sweep,team]"
    assert sorted(p.name for p in venv.glob(".installed*")) == [".installed-gpu"]
    log.unlink()
    assert make(folder, "install", gpu_listing=GPU_LISTING).returncode == 0
    assert not log.exists()  # up to date: pip not called again
