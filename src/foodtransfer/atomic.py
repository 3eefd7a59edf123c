"""Atomic outputs: write under a temporary name, then rename, so an interrupted stage never
leaves a file or folder that DVC (or the next stage) would take as complete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _prefix(path: Path) -> str:
    """Temporary names carry the writer's process id: ``.<name>.pid<pid>.<random>.tmp``."""
    return f".{path.name}.pid{os.getpid()}."


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries beside ``path`` that a killed writer (SIGKILL, OOM killer, power
    loss) could not clean up: those whose process is gone. Returns what was removed."""
    pattern = re.compile(re.escape(f".{path.name}.pid") + r"(\d+)\..+\.(?:tmp|old)$")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match is None or process_alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def _temporary_dir(path: Path) -> Path:
    """A new empty hidden folder beside ``path``, named for this process, after removing the
    ones killed writers left there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp_name, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``.

    On failure (an exception, SIGTERM turned into an exception) the temporary folder is
    removed and ``path`` is left as it was (absent, when DVC removed it before the stage).
    A process killed outright leaves its hidden temporary folder behind: DVC ignores it (it is
    not an output) and the next write of ``path`` removes it.
    """
    path = Path(path)
    tmp = _temporary_dir(path)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace(source: Path, path: Path) -> None:
    """Put the file or folder ``source`` at ``path`` (same file system) by a rename, moving
    whatever was there out of the way first."""
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(source, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, path)


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Yield a stand-in for each of ``paths`` (same name, in a hidden temporary folder beside
    it); when the block succeeds each stand-in that was written is renamed onto its path, and
    otherwise none is: a stage that fails after writing leaves no output behind."""
    temporaries = [_temporary_dir(Path(path)) for path in paths]
    try:
        stand_ins = [tmp / Path(path).name for tmp, path in zip(temporaries, paths)]
        yield stand_ins
        for stand_in, path in zip(stand_ins, paths):
            if stand_in.exists():
                replace(stand_in, Path(path))
    finally:
        for tmp in temporaries:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` for intermediate files, removed on
    exit whatever happens (and, after a kill, by the next :func:`scratch_dir` of ``path``)."""
    path = Path(path)
    tmp = _temporary_dir(path)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
