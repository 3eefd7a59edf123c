"""Shared fixtures. Keep this file small: fixtures used by one test module live in that module.

Data fixtures (prefix ``sample_``) build a tiny generated Food-101 stand-in once per session:
3 classes, 12 train + 4 test images per class, 16-40 px. Tests must not modify what a
session-scoped fixture returns; copy it first.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from foodtransfer.config import SampleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# Progress bars off, whatever the terminal.
os.environ["FOODTRANSFER_PROGRESS"] = "0"


# `make test` runs each module whole on one of two workers (--dist loadfile) in this order
# (--no-loadscope-reorder): the slowest modules first, so that no worker starts a long one
# when the other is nearly done.
SLOWEST_FIRST = ("test_team.py", "test_pipeline_e2e.py", "test_sweep_local.py",
                 "test_faults_pipeline.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


# --------------------------------------------------------------------------- data fixtures

SAMPLE_CLASSES = ["pizza", "sushi", "tacos"]
SAMPLE_SEED = 7
# Class 0 (pizza) gets an empty and a truncated file in its train list, class 1 (sushi) a PNG
# named .jpg (foodtransfer.data.sample.BAD_FILES): pizza has 10 usable train images, the others 12.
SAMPLE_CONFIG = SampleConfig(train_per_class=12, test_per_class=4, min_side=16, max_side=40)


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated sample .tar.gz (SAMPLE_CLASSES, SAMPLE_CONFIG, SAMPLE_SEED). Read-only."""
    from foodtransfer.data.sample import build_sample_archive

    path = tmp_path_factory.mktemp("sample") / "food-101-sample.tar.gz"
    build_sample_archive(path, SAMPLE_CLASSES, SAMPLE_CONFIG, SAMPLE_SEED, show_progress=False)
    return path


@pytest.fixture(scope="session")
def sample_raw_dir(sample_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sample_archive`` extracted as the download stage does. Read-only."""
    from foodtransfer.data.archive import extract

    raw = tmp_path_factory.mktemp("sample_raw") / "raw"
    extract(sample_archive, raw, list(SAMPLE_CLASSES), show_progress=False)
    return raw


@pytest.fixture(scope="session")
def sample_trimmed_dir(sample_raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sample_raw_dir`` trimmed to 10 train + 3 test images per class at 16 px. Read-only."""
    from foodtransfer.stages.trim import trim

    out = tmp_path_factory.mktemp("sample_trimmed") / "trimmed"
    trim(sample_raw_dir, out, classes=list(SAMPLE_CLASSES), samples_per_class=10,
         test_per_class=3, allow_fewer=False, image_size=16, seed=SAMPLE_SEED, workers=1,
         show_progress=False)
    return out


# ------------------------------------------------------------------------ the stage commands
def stage_args(stage: str) -> list[str]:
    """The arguments dvc.yaml passes to ``pipeline/<stage>.py`` (its paths), so that tests run
    a stage script exactly as DVC does."""
    command = shlex.split(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
                          ["stages"][stage]["cmd"])
    return command[2:]


# ------------------------------------------------------------------------ params fixtures

def merge_params(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys replaced, recursively into sections."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (merge_params(base.get(key, {}), value) if isinstance(value, dict)
                       else value)
    return merged


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write a params.yaml into tmp_path: ``write_params({"seed": 1}, name="p.yaml")``."""

    def write(raw: dict[str, Any], name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


# ------------------------------------------------------------------ loopback HTTP servers

@contextlib.contextmanager
def loopback_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1 at a free port (one thread per request) while the block
    runs; yields the port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------- server processes
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90.0,
                  log: Path | None = None) -> None:
    """Until ``url`` answers 200; fails early (with the process's log) if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text()[-5000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{process.args} exited with {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the process and its children (its own session), SIGKILL if they linger."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent


def start_server(command: list[str], url: str, log: Path, **kwargs: Any) -> subprocess.Popen:
    """Start ``command`` (a server) in its own session, its output to the file ``log`` (a pipe
    nobody reads would fill up and stall the server), and wait until ``url`` answers."""
    with open(log, "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, **kwargs)
    try:
        wait_for_http(url, process, log=log)
    except BaseException:
        stop_process_group(process)
        raise
    return process


@contextlib.contextmanager
def server_process(command: list[str], url: str, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """Run ``command`` (a server) until ``url`` answers; stop it and its children when the
    block ends, also on failure."""
    with tempfile.TemporaryDirectory() as folder:
        process = start_server(command, url, Path(folder) / "server.log", **kwargs)
        try:
            yield process
        finally:
            stop_process_group(process)


def grey_png(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` pixels, compressed to almost nothing (18 000
    x 18 000: about 320 KB that decode to 324 MB of grey, 972 MB as RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width  # filter type 0, mid grey
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"0.5 setgray 0 0 64 64 rectfill\nshowpage\n%%EOF\n")


def http_json(url: str, payload: dict | None = None, timeout: float = 30) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type":
                                                              "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# ------------------------------------------------------------- the learnable stand-in backbone
@pytest.fixture(scope="session")
def standin_weights() -> Path:
    """MobileNetV2 weights pretrained by the suite on generated classes (tests/standin.py):
    frozen, they carry the sample's signal, as ImageNet weights carry a photo's. Read-only."""
    from standin import standin_weights as make

    return make()


def add_weights(repo: Path, weights: Path, env: dict[str, str]) -> str:
    """Copy ``weights`` into ``repo``'s weights/ folder and track it with DVC, as a user
    brings local weights; returns the value for the ``weights`` param."""
    import shutil

    target = repo / "weights" / "standin.weights.h5"
    target.parent.mkdir(exist_ok=True)
    shutil.copy(weights, target)
    subprocess.run(["dvc", "add", "-q", str(target.relative_to(repo))], cwd=repo, env=env,
                   check=True, capture_output=True, timeout=300)
    return "weights/standin.weights.h5"


# ------------------------------------------------------------------ a real headless browser
CHROMIUM = os.environ.get("FOODTRANSFER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FOODTRANSFER_CHROMEDRIVER", "/usr/bin/chromedriver")
# Flags for a closed network, as root: no sandbox, no GPU, no background connections.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1600,1000")


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Selenium through Debian's chromedriver (given
    explicitly: Selenium downloads nothing); quit when the block ends, also on failure."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            raise AssertionError(
                f"no {path}: the browser tests need Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver, as .ci/run does), or "
                "FOODTRANSFER_CHROMIUM / FOODTRANSFER_CHROMEDRIVER naming other binaries.")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(120)
            yield driver
        finally:
            driver.quit()


def wait_until(condition: Callable[[], Any], timeout: float = 90.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what or condition}")
