"""Progress bars that show on a terminal and stay quiet in CI logs and under DVC pipes."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

# No monitor thread: stages fork decoding workers, and a thread alive at fork time can leave
# a lock held in the child.
tqdm.monitor_interval = 0


def progress_enabled() -> bool:
    if os.environ.get("FOODTRANSFER_PROGRESS") in ("0", "1"):
        return os.environ["FOODTRANSFER_PROGRESS"] == "1"
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(*, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (a context manager), disabled unless stderr is a terminal."""
    kwargs.setdefault("unit_scale", kwargs.get("unit") == "B")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(disable=not (enabled and progress_enabled()), leave=False, **kwargs)
