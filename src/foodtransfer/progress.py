"""Progress a user can follow: a redrawn bar on a terminal, and whole lines at a bounded rate
where stderr is a log (``dvc repro`` piped, ``dvc queue logs``, CI), never thousands of
carriage-return frames.

``FOODTRANSFER_PROGRESS`` chooses: unset (a bar on a terminal, lines elsewhere), ``bar``,
``lines`` or ``0`` (nothing; ``1`` is ``bar``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

# No monitor thread: stages fork decoding workers, and a thread alive at fork time can leave
# a lock held in the child.
tqdm.monitor_interval = 0

LINE_INTERVAL = 5.0  # seconds between two progress lines in a log
log = logging.getLogger("foodtransfer.progress")


def progress_mode() -> str:
    """``bar``, ``lines`` or ``off``."""
    setting = os.environ.get("FOODTRANSFER_PROGRESS", "").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return "off"
    if setting in ("1", "bar"):
        return "bar"
    if setting == "lines":
        return "lines"
    return "bar" if sys.stderr.isatty() else "lines"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineProgress:
    """Progress as log lines: at most one every ``interval`` seconds, and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0,
                 interval: float = LINE_INTERVAL) -> None:
        self.total, self.desc, self.unit = total, desc, unit.strip() or "items"
        self.n = self.initial = initial
        self.interval = interval
        self.started = self.last = time.monotonic()

    def _line(self, done: bool = False) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        scale, unit = (2**20, "MiB") if self.unit == "B" else (1, self.unit)
        rate = (self.n - self.initial) / elapsed
        done_text = f"{self.n / scale:.1f}" if scale > 1 else f"{self.n}"
        text = f"{self.desc}: {done_text}"
        if self.total:
            total_text = f"{self.total / scale:.1f}" if scale > 1 else f"{self.total}"
            text += f"/{total_text} {unit} ({100 * self.n / self.total:.0f} %)"
        else:
            text += f" {unit}"
        text += f", {rate / scale:.1f} {unit}/s"
        if done:
            return text + f", done in {duration(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {duration((self.total - self.n) / rate)}"
        return text

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info(self._line())

    def close(self) -> None:
        log.info(self._line(done=True))

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, kind, *exc: object) -> None:
        if kind is None:
            self.close()


def progress(*, enabled: bool = True, total: int | None = None, desc: str = "",
             unit: str = "items", initial: int = 0, **kwargs: Any):
    """A context manager with ``update(count)``: a tqdm bar on a terminal, log lines at a
    bounded rate elsewhere, nothing when ``enabled`` is false or progress is off."""
    mode = progress_mode() if enabled else "off"
    if mode == "lines":
        return LineProgress(total, desc, unit, initial=initial)
    kwargs.setdefault("unit_scale", unit == "B")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit if unit == "B" else f" {unit}",
                initial=initial, disable=mode == "off", leave=False, **kwargs)
