"""What every stage script shares: its path options' panels, TensorFlow's environment, logging,
clean exits on user errors and SIGTERM, and one summary line at the end."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType

import typer

from foodtransfer.errors import UserError

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)

# The help panels of a stage script's path options: what the stage reads (DVC deps) and writes
# (DVC outs). The DAG test (tests/test_dag.py) checks them against dvc.yaml.
INPUT = "Inputs (DVC deps)"
OUTPUT = "Outputs (DVC outs)"
CACHE = "Cache (read and written, not tracked by DVC)"


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks and atomic writes clean up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"stopped by signal {signum}")


def _redeliver_swallowed_sigterm(previous: Callable) -> Callable:
    """An unraisable-exception hook that re-sends SIGTERM when Python swallowed Terminated.

    Python runs the signal handler at the next bytecode of the main thread, which may be
    inside code whose exceptions it only prints ("Exception ignored in ..."): an at-fork
    callback (trim's worker processes start with a fork), a ``__del__`` or a weakref callback.
    The stage would then run on to completion as if no signal had come. Sending the signal
    again a moment later raises it in ordinary code, where it stops the stage."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)

    return hook


def prepare_tensorflow() -> None:
    """Call before importing TensorFlow.

    - Keeps TensorFlow's C++ log lines out of the way (start-up notes, and a spurious
      "NodeDef mentions attribute use_unbounded_threadpool" error that tf.data prints on every
      run of TF 2.21). Python warnings and exceptions still show; set TF_CPP_MIN_LOG_LEVEL=0
      to see every C++ line.
    - Caps glibc's malloc arenas at 2 (as MALLOC_ARENA_MAX=2 would; an explicit
      MALLOC_ARENA_MAX wins). With one arena per thread, TensorFlow's and tf.data's thread
      pools fragment memory so that peak RSS creeps up with the number of batches; capped, it
      stays flat whatever the dataset size (measured by bench/benchmark.py, row 4).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "MALLOC_ARENA_MAX" not in os.environ and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_ARENA_MAX, 2)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to cap
            pass
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
        _import_tensorflow_quietly()


# What TensorFlow's C++ prints on import whatever TF_CPP_MIN_LOG_LEVEL says (absl logs before
# it is initialised): a note on oneDNN's round-off, twice, each after absl's preamble.
_IMPORT_NOTICES = re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\)|"
                             r"^I0000 .*port\.cc:\d+\] oneDNN custom operations are on")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow now, with fd 2 caught: its start-up notices (:data:`_IMPORT_NOTICES`)
    are dropped, anything else it writes is passed on. Without TensorFlow nothing happens here
    (the stage's own import then fails with its one-line error)."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to catch (2>&-): import it plainly
        with contextlib.suppress(ImportError):
            import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not _IMPORT_NOTICES.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def run_stage(name: str, body: Callable[[], str]) -> None:
    """Run ``body`` (which returns a one-line summary) as the stage ``name``.

    A :class:`UserError` prints ``<name>: error: <message>`` and exits with code 2; SIGTERM
    exits with 143 after cleanup. Either way no partial output is left (outputs are atomic).
    """
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed_sigterm(previous_hook)
    started = time.monotonic()
    try:
        from foodtransfer.tracking.uri import check_login, login_error, tracking_uri

        check_login()  # a team server's login, before any work (a no-op on a local store)
        summary = body()
    except UserError as error:
        typer.secho(f"{name}: error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "tensorflow":
            raise
        typer.secho(f"{name}: error: TensorFlow is not installed in {sys.prefix}: run 'make "
                    "install' (it picks the CPU or GPU build), or pip install -e '.[cpu]' "
                    "(or '.[gpu]').", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except Terminated as error:
        typer.secho(f"{name}: {error}; partial outputs removed", err=True, fg=typer.colors.RED)
        raise typer.Exit(143) from None
    except Exception as error:  # a tracking server refused a call (a permission): one line
        problem = login_error(error, tracking_uri())
        if problem is None:
            raise
        typer.secho(f"{name}: error: {problem}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
    _write_params_read(name)
    typer.echo(f"{name}: {summary} [{time.monotonic() - started:.1f}s]")


def _write_params_read(name: str) -> None:
    """Where the DAG test asks (FOODTRANSFER_RECORD_PARAMS), the params this stage read."""
    from foodtransfer import config

    folder, keys = os.environ.get(config.RECORD_PARAMS_ENV), config.params_read()
    if folder and keys is not None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as handle:
            json.dump(keys, handle)
