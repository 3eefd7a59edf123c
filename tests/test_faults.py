"""Real faults, quickly: the stage scripts run as subprocesses on bad params (they must stop
within seconds, before any download or output), a host name that does not resolve, a disk too
small for the archive, huge and decompression-bomb images, and MLflow stores that cannot be
used. The interrupted, concurrent and repeated pipeline runs are in test_faults_pipeline.py.

What these complement: test_config.py checks every validation message in-process,
test_download.py the HTTP faults of download(), test_data.py the other bad image files.
"""

from __future__ import annotations

import http.server
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, loopback_http_server, merge_params, stage_args
from foodtransfer.data import food101

STAGE_TIME_LIMIT = 20.0  # "within seconds": a params error must not wait for TensorFlow

VALID = {
    "image_size": 32, "backbone": "MobileNetV2", "weights": "none", "epochs": 2,
    "features": {"crop": 1.0},  # MobileNetV2 needs 32 px: no crop
    "data": {"source": "sample", "classes": ["pizza", "sushi"], "samples_per_class": 4,
             "test_per_class": 2,
             "sample": {"train_per_class": 5, "test_per_class": 2, "min_side": 16,
                        "max_side": 24}},
}


def run_stage(stage: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python pipeline/<stage>.py`` of this checkout in ``cwd`` with the paths dvc.yaml
    gives it; (result, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / f"{stage}.py"),
                             *stage_args(stage)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------ a loopback HTTP server

class Server:
    """An HTTP server on 127.0.0.1 that counts requests. By default it serves nothing (404);
    ``announce`` makes it answer 200 with that Content-Length, send 64 KiB of it and stall."""

    def __init__(self) -> None:
        self.requests = 0
        self.announce: int | None = None
        self.port = 0

    def url(self, name: str = "food-101.tar.gz") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            state.requests += 1
            if state.announce is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(state.announce))
            self.end_headers()
            self.wfile.write(b"\0" * 65536)
            self.wfile.flush()
            stop.wait(10)  # a client that keeps reading would wait here, not get 5 GB

    with loopback_http_server(Handler) as state.port:
        try:
            yield state
        finally:
            stop.set()  # before the server shuts down: release a stalled handler


# -------------------------------------------------- params: the real stage scripts, in seconds

PARAMS_FAULTS = {
    # id: (stage, override, texts the error must contain)
    "typo": ("download", {"dropuot": 0.5},
             ["unknown key 'dropuot'", "Did you mean 'dropout'?", "Known keys here:"]),
    "wrong-type": ("trim", {"epochs": "ten"},
                   ["epochs = 'ten'", "wrong type", "an integer"]),
    "dropout-1.5": ("dropout", {"dropout": 1.5},
                    ["dropout = 1.5", "out of range", ">= 0", "< 1"]),
    "negative-epochs": ("transfer", {"epochs": -3},
                        ["epochs = -3", "out of range", ">= 1"]),
    "val-fraction-0": ("split", {"data": {"val_fraction": 0}},
                       ["data.val_fraction = 0.0", "out of range", "> 0", "< 1"]),
    "unknown-class": ("download", {"data": {"classes": ["pizza", "piza"]}},
                      ["'piza' (did you mean 'pizza'?)", "Known classes:"]),
    "unknown-backbone": ("features", {"backbone": "MobileNetV9"},
                         ["backbone = 'MobileNetV9'", "not a known backbone", "MobileNetV2",
                          "EfficientNetV2B0"]),
    "missing-weights": ("features", {"weights": "/nowhere/mobilenet_v2.weights.h5"},
                        ["weights = '/nowhere/mobilenet_v2.weights.h5'",
                         "neither 'imagenet', 'none' nor an existing weights file"]),
    "baseline-type": ("baseline", {"baseline": {"augment": "yes"}},
                      ["baseline.augment = 'yes'", "true or false"]),
    "finetune-range": ("finetune", {"finetune": {"lr_scale": 0}},
                       ["finetune.lr_scale = 0.0", "out of range", "> 0"]),
}


@pytest.mark.parametrize("case", list(PARAMS_FAULTS))
def test_bad_params_stop_the_real_stage_within_seconds(case: str, tmp_path: Path,
                                                       server: Server) -> None:
    stage, override, expected = PARAMS_FAULTS[case]
    # The real archive source, at a server that counts requests: a download would show.
    online = {"data": {"source": "food101", "url": server.url(), "md5": None}}
    params = merge_params(merge_params(VALID, online), override)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result, seconds = run_stage(stage, tmp_path)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert seconds < STAGE_TIME_LIMIT, f"{stage} took {seconds:.1f}s to reject its params"
    message = result.stderr
    assert f"{stage}: error: params: " in message
    for text in expected:
        assert text in message, (text, message)
    assert "Traceback" not in message and result.stdout == ""
    assert server.requests == 0  # nothing downloaded
    assert files_under(tmp_path) == ["params.yaml"]  # no data/, mlruns/, models/ ...


# ------------------------------------------------------------------------- download faults

def test_a_stage_without_tensorflow_says_how_to_install_it(tmp_path: Path) -> None:
    """`pip install -e .` installs no TensorFlow (it is the cpu or gpu extra): a stage run in
    such an environment says so in one line, not with a traceback."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(VALID))
    code = ("import runpy, sys; sys.modules['tensorflow'] = None; "
            f"sys.argv = ['features.py', *{stage_args('features')!r}]; "
            f"runpy.run_path({str(REPO_ROOT / 'pipeline' / 'features.py')!r}, "
            "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "features: error: TensorFlow is not installed" in result.stderr
    assert "make install" in result.stderr and "Traceback" not in result.stderr


def test_dns_failure_is_one_clear_error(tmp_path: Path) -> None:
    # .invalid is reserved (RFC 2606): it never resolves, and fails without network traffic.
    url = "http://food101.invalid/food-101.tar.gz"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        merge_params(VALID, {"data": {"source": "food101", "url": url, "md5": None}})))
    result, seconds = run_stage("download", tmp_path)
    assert result.returncode == 2, result.stderr
    assert seconds < 60
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith(f"download: error: Cannot reach {url}: the host name "
                              "'food101.invalid' does not resolve (DNS: ")
    assert "data.url=file://" in message and "data.source=sample" in message  # the fixes
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_not_enough_disk_space_stops_before_the_body(tmp_path: Path, server: Server) -> None:
    # The server announces more bytes than the disk holds (a 5 GB archive on a small disk).
    server.announce = shutil.disk_usage(tmp_path).free + (1 << 40)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        merge_params(VALID, {"data": {"source": "food101", "url": server.url(),
                                      "md5": None}})))
    result, seconds = run_stage("download", tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert seconds < STAGE_TIME_LIMIT
    assert f"download: error: Not enough free disk space to download {server.url()}" in \
        result.stderr
    assert "GiB free" in result.stderr and "Free some space" in result.stderr
    assert server.requests == 1
    # Nothing of the body reached the disk: no partial file, no extracted data.
    downloads = tmp_path / "data" / "downloads"
    assert not downloads.exists() or files_under(downloads) == []
    assert not (tmp_path / "data" / "raw").exists()


# --------------------------------------------------------------------- huge and bomb images

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none: a decompression bomb's
    header (decoding it would need width * height * 3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_huge_images_are_decoded_and_bombs_skipped(tmp_path: Path) -> None:
    from foodtransfer.stages.trim import trim

    raw = tmp_path / "raw"
    files = {
        "pizza/1": _jpeg((7_500, 7_500), (200, 120, 30)),  # 56 MP: a large photo, decoded
        "pizza/2": _jpeg((10_000, 16), (20, 200, 60)),  # 10 000 px strip
        "pizza/3": _png_header_only(30_000, 30_000),  # 2.7 GB once decoded
        "pizza/4": _jpeg((40, 30), (40, 40, 220)),
        "sushi/1": _jpeg((30, 30), (90, 90, 90)),
    }
    for image_id, data in files.items():
        (raw / food101.IMAGES_DIR / image_id).parent.mkdir(parents=True, exist_ok=True)
        (raw / food101.IMAGES_DIR / f"{image_id}.jpg").write_bytes(data)
    meta = raw / food101.META_DIR
    meta.mkdir(parents=True)
    (meta / "classes.txt").write_text("pizza\nsushi\n")
    (meta / "train.txt").write_text("".join(f"{i}\n" for i in files))
    (meta / "test.txt").write_text("pizza/4\nsushi/1\n")

    out = tmp_path / "trimmed"
    started = time.monotonic()
    result = trim(raw, out, classes=["pizza", "sushi"], samples_per_class="all",
                  test_per_class="all", allow_fewer=False, image_size=24, seed=0, workers=2,
                  show_progress=False)
    assert time.monotonic() - started < 60
    assert result.counts["train"] == {"pizza": 3, "sushi": 1}
    report = pd.read_csv(out / "report.csv")
    assert report.to_dict("records") == [{
        "split": "train", "image_id": "pizza/3", "action": "skipped",
        "reason": report.loc[0, "reason"]}]
    assert report.loc[0, "reason"].startswith("the image declares 900000000 pixels (900 MP), "
                                              "over the limit of 60 MP")
    assert "not decoded" in report.loc[0, "reason"]
    train = pd.read_csv(out / "train.csv").set_index("image_id")
    import numpy as np

    pixels = np.load(out / "train.npy")
    square = pixels[train.loc["pizza/1", "index"]].astype(int)
    strip = pixels[train.loc["pizza/2", "index"]].astype(int)
    assert square.shape == strip.shape == (24, 24, 3)
    assert np.abs(square - (200, 120, 30)).max() <= 6
    assert np.abs(strip - (20, 200, 60)).max() <= 8


# ------------------------------------------------------------------ MLflow stores, quickly

@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "DVC_")):
            monkeypatch.delenv(name)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_to_an_unreachable_server_fails_fast(mlflow_env, monkeypatch) -> None:
    from foodtransfer.tracking import store as tracking
    from foodtransfer.errors import TrackingError

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        tracking.connect("faults")
    # MLflow's default (7 retries, exponential backoff) would take minutes.
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert f"Cannot use the MLflow tracking store {uri}" in message
    assert "Connection refused" in message and "MLFLOW_TRACKING_URI" in message
    # The fail-fast settings were for the check only: later logging keeps MLflow's retries.
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_connect_keeps_the_users_retry_settings(mlflow_env, monkeypatch) -> None:
    from foodtransfer.tracking import store as tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    with tracking._fail_fast_http("http://tracking.example.org"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_connect_to_a_store_that_is_a_file_fails_fast(mlflow_env, monkeypatch,
                                                      tmp_path: Path) -> None:
    """mlruns exists as a regular file (unwritable as a store, for root too)."""
    from foodtransfer.tracking import store as tracking
    from foodtransfer.errors import TrackingError

    (tmp_path / "mlruns").write_text("not a folder\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(TrackingError) as info:
        tracking.connect("faults")
    message = str(info.value)
    assert f"The MLflow store {tmp_path / 'mlruns'} is not writable" in message
    assert "MLFLOW_TRACKING_URI" in message
    assert (tmp_path / "mlruns").read_text() == "not a folder\n"


def test_connect_serialises_creating_a_fresh_store(mlflow_env, monkeypatch,
                                                   tmp_path: Path) -> None:
    """Several processes open a store that does not exist yet, at once (what
    `dvc queue start -j N` does on a new clone): all get the same experiment."""
    code = ("import sys; from foodtransfer.tracking.store import connect; "
            "print(connect('race'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DVC_ROOT"] = str(tmp_path)
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    for code_, out, err in results:
        assert code_ == 0, err
        assert "locked" not in err and "already exists" not in err
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment id


def test_an_experiment_created_from_a_temporary_clone_keeps_its_artifacts(
        mlflow_env, tmp_path: Path) -> None:
    """A sweep's first task creates the experiment from inside its temporary clone, logging to
    the project's SQLite store: the experiment's artifacts go beside that store, not into the
    clone (which is deleted), so every later run's artifacts outlive it."""
    import mlflow

    project, clone = tmp_path / "project", tmp_path / "clone"
    (project / "mlruns").mkdir(parents=True)
    clone.mkdir()
    (clone / "note.txt").write_text("logged from the clone\n")
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    code = ("from pathlib import Path; from foodtransfer.tracking.runs import tracked_run\n"
            "with tracked_run('fresh', 'dropout', 'variant', {}, {}) as run:\n"
            "    run.log_artifact(Path('note.txt'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=uri, DVC_ROOT=str(clone))  # as in a sweep task's clone
    result = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(clone)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("fresh")
    assert experiment.artifact_location == (project / "mlruns" / "artifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    path = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path))
    assert Path(path).read_text() == "logged from the clone\n"
