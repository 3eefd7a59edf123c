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
    """Keep TensorFlow's C++ start-up chatter (oneDNN, CPU feature notes) out of the way;
    Python warnings and errors still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


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
