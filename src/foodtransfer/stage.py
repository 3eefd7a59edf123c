"""What every stage script shares: logging, clean exits on user errors and SIGTERM, and one
summary line at the end."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import typer

from foodtransfer.errors import UserError


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks and atomic writes clean up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"stopped by signal {signum}")


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ log lines out of the way (start-up notes, and a spurious
    "NodeDef mentions attribute use_unbounded_threadpool" error that tf.data prints on every
    run of TF 2.21). Python warnings and exceptions still show; set TF_CPP_MIN_LOG_LEVEL=0 to
    see every C++ line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
    started = time.monotonic()
    try:
        summary = body()
    except UserError as error:
        typer.secho(f"{name}: error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except Terminated as error:
        typer.secho(f"{name}: {error}; partial outputs removed", err=True, fg=typer.colors.RED)
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo(f"{name}: {summary} [{time.monotonic() - started:.1f}s]")
