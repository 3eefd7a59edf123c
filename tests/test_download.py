"""Download (resume, restart, md5, HTTP errors) against a real HTTP server on 127.0.0.1, and
selective extraction of real .tar.gz archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import loopback_http_server
from foodtransfer.data import food101
from foodtransfer.config import parse_params
from foodtransfer.data.archive import (
    _check_space,
    download,
    extract,
    fetch_archive,
    file_md5,
)
from foodtransfer.errors import DownloadError


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------- loopback HTTP server

@dataclass
class ServedRequest:
    path: str
    range: str | None
    status: int
    sent: int = 0  # body bytes written
    done: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass
class FileServer:
    """Serves ``payload`` at every path. Switches: ``support_range``, ``cut_after`` (close the
    connection after that many body bytes on the next request, then serve normally), and
    ``status`` (answer every request with that HTTP error)."""

    payload: bytes = b""
    support_range: bool = True
    cut_after: int | None = None
    status: int | None = None
    requests: list[ServedRequest] = field(default_factory=list)
    port: int = 0

    @property
    def served(self) -> list[ServedRequest]:
        """The requests so far, once their handlers have finished writing."""
        for request in self.requests:
            assert request.done.wait(timeout=10), f"handler for {request} did not finish"
        return self.requests

    def url(self, name: str = "food-101.tar.gz") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


def _handler_for(state: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            record = ServedRequest(self.path, self.headers.get("Range"), status=0)
            state.requests.append(record)
            try:
                self._answer(record)
            finally:
                record.done.set()

        def _answer(self, record: ServedRequest) -> None:
            if state.status is not None:
                record.status = state.status
                self.send_error(state.status)
                return
            data = state.payload
            start = 0
            if state.support_range and record.range:
                assert record.range.startswith("bytes=") and record.range.endswith("-")
                start = int(record.range[len("bytes="):-1])
            if start and start >= len(data):
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record.status = 206 if start else 200
            body = data[start:]
            self.send_response(record.status)
            if record.status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes" if state.support_range else "none")
            self.send_header("Content-Length", str(len(body)))  # always the full length
            self.end_headers()
            if state.cut_after is not None:
                body = body[:state.cut_after]
                state.cut_after = None  # only the first request is cut
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()
            record.sent = len(body)

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    with loopback_http_server(_handler_for(state)) as state.port:
        yield state


@pytest.fixture
def payload() -> bytes:
    # 300 KB of incompressible, reproducible bytes (not a multiple of any buffer size).
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, size=300_007, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------- tar.gz helpers

def make_archive(path: Path, images: dict[str, int], *, classes_txt: list[str] | None = None,
                 extra: dict[str, bytes] | None = None) -> Path:
    """A .tar.gz in the Food-101 layout: ``images`` maps class -> number of (fake) .jpg files;
    ``extra`` adds members with arbitrary names."""
    listed = classes_txt if classes_txt is not None else list(images)
    members: dict[str, bytes] = {}
    train, test = [], []
    for class_name, count in images.items():
        for i in range(count):
            image_id = f"{class_name}/{1000 + i}"
            members[f"{food101.IMAGES_DIR}/{image_id}.jpg"] = f"jpeg {image_id}".encode()
            (train if i % 4 else test).append(image_id)
    members[f"{food101.META_DIR}/classes.txt"] = ("\n".join(listed) + "\n").encode()
    members[f"{food101.META_DIR}/labels.txt"] = (
        "\n".join(food101.label_of(c) for c in listed) + "\n").encode()
    members[f"{food101.META_DIR}/train.txt"] = "".join(f"{i}\n" for i in train).encode()
    members[f"{food101.META_DIR}/test.txt"] = "".join(f"{i}\n" for i in test).encode()
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        root = tarfile.TarInfo(food101.ARCHIVE_ROOT)
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def leftovers(parent: Path) -> list[str]:
    """Temporary files/folders the atomic writers would leave behind in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------------------------- download

def test_full_download_and_md5(server: FileServer, payload: bytes, tmp_path: Path) -> None:
    server.payload = payload
    destination = tmp_path / "cache" / "food-101.tar.gz"
    result = download(server.url(), destination, show_progress=False)
    assert result.path == destination
    assert result.bytes_received == len(payload) and result.resumed_from == 0
    assert destination.read_bytes() == payload
    assert file_md5(destination, show_progress=False) == md5_of(payload)
    assert not destination.with_name(destination.name + ".part").exists()
    assert len(server.served) == 1 and server.served[0].range is None
    assert server.served[0].sent == len(payload)


def test_cut_download_keeps_part_and_resumes_with_range(server: FileServer, payload: bytes,
                                                        tmp_path: Path) -> None:
    server.payload = payload
    server.cut_after = 123_456
    destination = tmp_path / "food-101.tar.gz"
    part = tmp_path / "food-101.tar.gz.part"

    with pytest.raises(DownloadError) as info:
        download(server.url(), destination, timeout=10, show_progress=False)
    message = str(info.value)
    assert "was cut after 123456" in message and "resumes" in message
    assert server.url() in message
    assert not destination.exists()
    assert part.read_bytes() == payload[:123_456]

    result = download(server.url(), destination, timeout=10, show_progress=False)
    assert len(server.served) == 2
    resumed = server.served[1]
    assert resumed.range == "bytes=123456-"
    assert resumed.status == 206
    assert resumed.sent == len(payload) - 123_456  # only the rest went over the wire
    assert result.resumed_from == 123_456
    assert result.bytes_received == len(payload) - 123_456
    assert md5_of(destination.read_bytes()) == md5_of(payload)
    assert not part.exists()


def test_server_without_range_restarts_from_zero(server: FileServer, payload: bytes,
                                                 tmp_path: Path) -> None:
    server.payload = payload
    server.support_range = False
    server.cut_after = 50_000
    destination = tmp_path / "food-101.tar.gz"
    with pytest.raises(DownloadError, match="resumes"):
        download(server.url(), destination, timeout=10, show_progress=False)

    result = download(server.url(), destination, timeout=10, show_progress=False)
    assert server.served[1].range == "bytes=50000-"  # asked to resume ...
    assert server.served[1].status == 200  # ... the server sent everything
    assert result.resumed_from == 0 and result.bytes_received == len(payload)
    # The old partial bytes were not kept in front of the new copy.
    assert destination.read_bytes() == payload


def test_part_that_is_already_complete(server: FileServer, payload: bytes,
                                       tmp_path: Path) -> None:
    server.payload = payload
    destination = tmp_path / "food-101.tar.gz"
    destination.with_name(destination.name + ".part").write_bytes(payload)
    result = download(server.url(), destination, timeout=10, show_progress=False)
    assert server.served[0].status == 416 and server.served[0].sent == 0
    assert result.bytes_received == 0 and result.resumed_from == len(payload)
    assert destination.read_bytes() == payload


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_url_and_offline_fix(server: FileServer, tmp_path: Path,
                                              status: int) -> None:
    server.status = status
    url = server.url()
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "food-101.tar.gz", timeout=10, show_progress=False)
    message = str(info.value)
    assert url in message
    assert f"HTTP {status}" in message
    assert "data.source=sample" in message and "file://" in message
    assert not (tmp_path / "food-101.tar.gz").exists()
    assert not (tmp_path / "food-101.tar.gz.part").exists()


def test_refused_connection_names_url(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/food-101.tar.gz"
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "food-101.tar.gz", timeout=10, show_progress=False)
    message = str(info.value)
    assert f"Cannot reach {url}" in message
    assert "data.source=sample" in message


# ---------------------------------------------------------------------------- fetch_archive

def test_fetch_archive_downloads_verifies_and_reuses_the_cache(server: FileServer,
                                                               payload: bytes,
                                                               tmp_path: Path) -> None:
    server.payload = payload
    cache = tmp_path / "downloads"
    path = fetch_archive(server.url(), md5_of(payload), cache, show_progress=False)
    assert path == cache / "food-101.tar.gz" and path.read_bytes() == payload
    assert (cache / "food-101.tar.gz.md5ok").read_text().split()[0] == md5_of(payload)
    # A verified cached copy is used without asking the server again.
    assert fetch_archive(server.url(), md5_of(payload), cache, show_progress=False) == path
    assert len(server.served) == 1


def test_fetch_archive_redownloads_a_cached_copy_that_does_not_verify(
        server: FileServer, payload: bytes, tmp_path: Path) -> None:
    server.payload = payload
    cache = tmp_path / "downloads"
    cache.mkdir()
    (cache / "food-101.tar.gz").write_bytes(b"stale")
    path = fetch_archive(server.url(), md5_of(payload), cache, show_progress=False)
    assert path.read_bytes() == payload
    assert len(server.served) == 1
    assert (cache / "food-101.tar.gz.bad").read_bytes() == b"stale"


def test_md5_mismatch_moves_the_file_aside(server: FileServer, payload: bytes,
                                           tmp_path: Path) -> None:
    server.payload = payload
    cache = tmp_path / "downloads"
    expected = md5_of(b"another archive")
    with pytest.raises(DownloadError) as info:
        fetch_archive(server.url(), expected, cache, show_progress=False)
    message = str(info.value)
    assert "Checksum mismatch" in message
    assert md5_of(payload) in message and expected in message
    assert "data.md5" in message
    assert not (cache / "food-101.tar.gz").exists()
    assert (cache / "food-101.tar.gz.bad").read_bytes() == payload
    assert not (cache / "food-101.tar.gz.md5ok").exists()


def test_md5_mismatch_stops_the_download_stage_before_extracting(server: FileServer,
                                                                 tmp_path: Path) -> None:
    from foodtransfer.stages.download import run as run_download

    # A valid Food-101-layout archive: had extract been reached, it would have succeeded.
    archive = make_archive(tmp_path / "good.tar.gz", {"pizza": 4, "sushi": 4})
    server.payload = archive.read_bytes()
    params = parse_params({"data": {"url": server.url(), "md5": md5_of(b"other"),
                                    "classes": ["pizza", "sushi"]}})
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match="Checksum mismatch"):
        run_download(params, out, tmp_path / "downloads")
    assert not out.exists()
    assert leftovers(tmp_path) == []

    # With the right md5 the same stage extracts it.
    params = parse_params({"data": {"url": server.url(), "md5": md5_of(server.payload),
                                    "classes": ["pizza", "sushi"]}})
    summary = run_download(params, out, tmp_path / "downloads")
    assert "extracted 8 images of 2 classes" in summary
    assert sorted(p.name for p in (out / food101.IMAGES_DIR).iterdir()) == ["pizza", "sushi"]


def test_file_url_is_used_in_place(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "food-101.tar.gz", {"pizza": 2, "sushi": 2})
    cache = tmp_path / "downloads"
    md5 = md5_of(archive.read_bytes())
    path = fetch_archive(archive.as_uri(), md5, cache, show_progress=False)
    assert path == archive
    assert not cache.exists()  # nothing copied
    assert fetch_archive(archive.as_uri(), None, cache, show_progress=False) == archive


def test_file_url_with_wrong_md5_is_not_moved(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "food-101.tar.gz", {"pizza": 2, "sushi": 2})
    with pytest.raises(DownloadError) as info:
        fetch_archive(archive.as_uri(), md5_of(b"x"), tmp_path / "downloads",
                      show_progress=False)
    assert md5_of(archive.read_bytes()) in str(info.value)
    assert archive.exists()  # the user's own copy is never moved
    assert not archive.with_name(archive.name + ".bad").exists()


def test_file_url_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "food-101.tar.gz"
    with pytest.raises(DownloadError) as info:
        fetch_archive(missing.as_uri(), None, tmp_path / "downloads", show_progress=False)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "data.source=sample" in message


def test_not_enough_disk_space(tmp_path: Path) -> None:
    url = "http://example.org/food-101.tar.gz"
    with pytest.raises(DownloadError) as info:
        _check_space(tmp_path, 1 << 60, url)  # an exabyte
    message = str(info.value)
    assert "Not enough free disk space" in message and url in message
    assert str(tmp_path.resolve()) in message and "GiB free" in message
    _check_space(tmp_path, 1, url)  # one byte fits (assuming 256 MiB are free here)


# ----------------------------------------------------------------------------------- extract

def test_extract_keeps_only_meta_and_the_chosen_classes(tmp_path: Path) -> None:
    archive = make_archive(
        tmp_path / "a.tar.gz", {"pizza": 3, "sushi": 5, "tacos": 2},
        extra={
            "food-101/README.txt": b"license",
            "food-101/images/pizza/nested/deep.jpg": b"x",
            "food-101/../escaped.txt": b"x",
            "/tmp/absolute.txt": b"x",
            "other-root/meta/classes.txt": b"x",
        })
    out = tmp_path / "raw"
    counts = extract(archive, out, ["pizza", "sushi"], show_progress=False)
    assert counts == {"pizza": 3, "sushi": 5}
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected_meta = [f"{food101.META_DIR}/{m}" for m in
                     ("classes.txt", "labels.txt", "test.txt", "train.txt")]
    expected_images = [f"{food101.IMAGES_DIR}/{c}/{1000 + i}.jpg"
                       for c, n in (("pizza", 3), ("sushi", 5)) for i in range(n)]
    assert files == sorted(expected_meta + expected_images)
    assert (out / food101.IMAGES_DIR / "sushi" / "1004.jpg").read_bytes() == b"jpeg sushi/1004"
    assert not (tmp_path / "escaped.txt").exists()
    assert leftovers(tmp_path) == []


def test_extract_all_classes(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.tar.gz", {"pizza": 3, "sushi": 5, "tacos": 2})
    counts = extract(archive, tmp_path / "raw", None, show_progress=False)
    assert counts == {"pizza": 3, "sushi": 5, "tacos": 2}


def test_extract_replaces_an_existing_output(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.tar.gz", {"pizza": 1, "sushi": 1})
    out = tmp_path / "raw"
    (out / "stale").mkdir(parents=True)
    extract(archive, out, ["pizza"], show_progress=False)
    assert not (out / "stale").exists()
    assert (out / food101.IMAGES_DIR / "pizza" / "1000.jpg").exists()
    assert leftovers(tmp_path) == []


def test_extract_missing_class_is_named(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.tar.gz", {"pizza": 2, "sushi": 2},
                           classes_txt=["pizza", "sushi", "tacos"])
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as info:
        extract(archive, out, ["pizza", "tacos"], show_progress=False)
    message = str(info.value)
    assert "no images for class(es) tacos" in message and "data.classes" in message
    assert "pizza, sushi, tacos" in message  # what meta/classes.txt lists
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_extract_archive_without_meta_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "nometa.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("food-101/images/pizza/1.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match="not in the Food-101 layout") as info_:
        extract(archive, out, ["pizza"], show_progress=False)
    assert "classes.txt" in str(info_.value)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "not_gzip", "gzip_not_tar", "empty"])
def test_unreadable_archive_is_rejected_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    import gzip

    good = make_archive(tmp_path / "good.tar.gz", {"pizza": 40, "sushi": 40},
                        extra={f"food-101/images/pizza/big{i}.jpg": bytes(range(256)) * 200
                               for i in range(5)})
    data = good.read_bytes()
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes({
        "truncated": data[: len(data) // 2],
        "not_gzip": b"<html>404 Not Found</html>\n" * 40,
        "gzip_not_tar": gzip.compress(b"hello, this is not a tar archive\n" * 100),
        "empty": b"",
    }[kind])
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as info:
        extract(archive, out, ["pizza", "sushi"], show_progress=False)
    message = str(info.value)
    assert "not a readable .tar.gz" in message and str(archive) in message
    assert "download again" in message
    assert not out.exists()
    assert leftovers(tmp_path) == []
