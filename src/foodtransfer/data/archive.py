"""The Food-101 archive: download (resumable, md5-verified) and selective extraction.

The archive is kept in a download cache (``data/downloads/``) that is *not* a DVC output: DVC
deletes a stage's outputs before running it, which would throw away a partial 5 GB download.
Only the chosen classes' images and ``meta/`` are extracted into the stage's output, so DVC
hashes and caches what later stages use, not all 101 000 files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from foodtransfer.data import food101
from foodtransfer.atomic import atomic_dir
from foodtransfer.errors import DownloadError
from foodtransfer.progress import progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SPACE_MARGIN = 256 << 20  # keep this much free beyond the archive itself


FIX_HINT = ("Check the network and the URL, or point data.url at a downloaded copy "
            "(data.url=file:///path/to/food-101.tar.gz), or run offline on the generated "
            "sample with data.source=sample.")


def file_md5(path: Path, show_progress: bool = True) -> str:
    digest = hashlib.md5()
    size = path.stat().st_size
    with open(path, "rb") as handle, progress(total=size, desc=f"md5 {path.name}", unit="B",
                                              enabled=show_progress) as bar:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _local_path(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return None


@dataclass
class DownloadResult:
    path: Path
    bytes_received: int
    resumed_from: int


def _check_space(directory: Path, needed: int, url: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed + SPACE_MARGIN > free:
        raise DownloadError(
            f"Not enough free disk space to download {url}: it needs {needed / 2**30:.2f} GiB "
            f"more, and {directory.resolve()} has {free / 2**30:.2f} GiB free. Free some space "
            "(or move data/downloads to a larger disk with a symlink) and run again."
        )


def download(url: str, destination: Path, *, timeout: float = 60.0,
             show_progress: bool = True) -> DownloadResult:
    """Stream ``url`` to ``destination``, resuming ``destination.part`` with an HTTP Range
    request when a previous attempt was cut. A server that ignores Range restarts cleanly."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "foodtransfer"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The partial file already holds everything the server has.
            part.replace(destination)
            return DownloadResult(destination, 0, offset)
        raise DownloadError(
            f"Download of {url} failed: the server answered HTTP {error.code} {error.reason}. "
            + FIX_HINT
        ) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlparse(url).hostname
            reason = f"the host name {host!r} does not resolve (DNS: {reason.strerror})"
        raise DownloadError(f"Cannot reach {url}: {reason}. " + FIX_HINT) from error

    with response:
        status = getattr(response, "status", 200)
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            start = content_range.split(" ", 1)[-1].split("-", 1)[0]
            if start != str(offset):
                raise DownloadError(
                    f"Download of {url}: the server resumed at byte {start!r}, not {offset}. "
                    f"Delete {part} and run again."
                )
            mode, resumed_from = "ab", offset
        else:
            if offset:
                log.warning("%s does not support resuming (HTTP %s): restarting from byte 0",
                            url, status)
            mode, resumed_from, offset = "wb", 0, 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if remaining is not None:
            _check_space(destination.parent, remaining, url)
        total = offset + remaining if remaining is not None else None
        received = 0
        with open(part, mode) as handle, progress(total=total, initial=offset, unit="B",
                                                  desc=f"download {destination.name}",
                                                  enabled=show_progress) as bar:
            try:
                while chunk := response.read(CHUNK):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                handle.flush()
                raise DownloadError(
                    f"Download of {url} was cut after {offset + received} bytes ({error}). "
                    "Run the stage again: it resumes from that byte."
                ) from error
        if remaining is not None and received < remaining:
            raise DownloadError(
                f"Download of {url} was cut after {offset + received} of {total} bytes. "
                "Run the stage again: it resumes from that byte."
            )
    part.replace(destination)
    return DownloadResult(destination, received, resumed_from)


def _verified_marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".md5ok")


def _already_verified(archive: Path, md5: str) -> bool:
    marker = _verified_marker(archive)
    if not (archive.exists() and marker.exists()):
        return False
    stat = archive.stat()
    return marker.read_text().split() == [md5, str(stat.st_size), str(stat.st_mtime_ns)]


def verify_md5(archive: Path, md5: str | None, url: str, *, show_progress: bool = True) -> None:
    """Raise DownloadError and move the file aside (never used) when its md5 is not ``md5``."""
    if md5 is None or _already_verified(archive, md5):
        return
    actual = file_md5(archive, show_progress)
    if actual != md5.lower():
        bad = archive.with_name(archive.name + ".bad")
        if _local_path(url) is None:
            archive.replace(bad)
            where = f"The file was moved to {bad} and will not be used; the next run downloads again."
        else:
            where = "The file was not used."
        raise DownloadError(
            f"Checksum mismatch for {url}: md5 is {actual}, expected {md5}. {where} If you "
            "meant another archive, set data.md5 to its md5 (or null to skip the check)."
        )
    stat = archive.stat()
    _verified_marker(archive).write_text(f"{md5} {stat.st_size} {stat.st_mtime_ns}\n")


def fetch_archive(url: str, md5: str | None, cache_dir: Path, *,
                  show_progress: bool = True) -> Path:
    """Return a local, verified copy of the archive at ``url`` (a file:// URL is used in place)."""
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(
                f"data.url = {url!r} points at {local}, which does not exist. Download the "
                "archive there, fix data.url, or use data.source=sample."
            )
        verify_md5(local, md5, url, show_progress=show_progress)
        return local
    name = Path(urllib.parse.urlparse(url).path).name or "archive.tar.gz"
    archive = cache_dir / name
    if archive.exists() and md5 is not None:
        try:
            verify_md5(archive, md5, url, show_progress=show_progress)
            return archive
        except DownloadError:
            log.warning("cached %s did not verify; downloading again", archive)
    elif archive.exists():
        archive.unlink()  # without an md5 a cached copy cannot be trusted to match the URL
    started = time.monotonic()
    result = download(url, archive, show_progress=show_progress)
    log.info("downloaded %s (%d bytes, resumed from byte %d) in %.1fs", url,
             result.bytes_received, result.resumed_from, time.monotonic() - started)
    verify_md5(archive, md5, url, show_progress=show_progress)
    return archive


def _wanted(member_name: str, classes: set[str] | None) -> str | None:
    """Return the normalised path when the member is needed: meta files and chosen classes."""
    path = PurePosixPath(member_name)
    if path.is_absolute() or ".." in path.parts:
        return None
    parts = path.parts
    if len(parts) == 3 and parts[0] == food101.ARCHIVE_ROOT and parts[1] == "meta":
        return str(path)
    if len(parts) == 4 and parts[0] == food101.ARCHIVE_ROOT and parts[1] == "images":
        if classes is None or parts[2] in classes:
            return str(path)
    return None


def extract(archive: Path, destination: Path, classes: list[str] | None, *,
            show_progress: bool = True) -> dict[str, int]:
    """Extract ``meta/`` and the images of ``classes`` (None: all) from ``archive`` into
    ``destination`` in one streaming pass. Returns image counts per class."""
    wanted_classes = set(classes) if classes is not None else None
    counts: dict[str, int] = {}
    meta_seen: set[str] = set()
    with atomic_dir(destination) as tmp:
        try:
            with tarfile.open(archive, mode="r|gz") as tar, progress(
                desc="extract", unit="files", enabled=show_progress
            ) as bar:
                for member in tar:
                    if not member.isfile():
                        continue
                    relative = _wanted(member.name, wanted_classes)
                    if relative is None:
                        continue
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has content
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
                    parts = PurePosixPath(relative).parts
                    if parts[1] == "images":
                        counts[parts[2]] = counts.get(parts[2], 0) + 1
                    else:
                        meta_seen.add(parts[2])
                    bar.update(1)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise DownloadError(
                f"{archive} is not a readable .tar.gz archive ({type(error).__name__}: {error}). "
                "It may be truncated or not the Food-101 archive: delete it and download again, "
                "or check data.url."
            ) from error
        missing_meta = [m for m in ("classes.txt", "train.txt", "test.txt") if m not in meta_seen]
        if missing_meta:
            raise DownloadError(
                f"{archive} has no {food101.META_DIR}/{', '.join(missing_meta)}: it is not in the "
                "Food-101 layout (food-101/images/<class>/<id>.jpg, food-101/meta/*.txt)."
            )
        if classes is not None:
            missing = [c for c in classes if c not in counts]
            if missing:
                listed = (tmp / food101.META_DIR / "classes.txt").read_text().split()
                raise DownloadError(
                    f"{archive} has no images for class(es) {', '.join(missing)}. Classes its "
                    f"meta/classes.txt lists: {', '.join(listed)}. Fix data.classes."
                )
    return counts
