"""A learnable stand-in for ImageNet weights: the product's sample weights, cached for the suite.

Random-weight backbones (``weights=none``) give features of about 1e-12 at our test sizes:
every head then predicts the same near-uniform probabilities for every image, and a test of
the transfer path passes whatever the code does. Real ImageNet weights cannot be downloaded
here, and the tests must not depend on ``../shared``. So the suite brings the weights that
``foodtransfer sample-weights`` makes (src/foodtransfer/models/sample_weights.py: MobileNetV2
briefly pretrained on 8 other generated classes), the way a user brings a local weights file.
With them a head learns (see the bars in tests/test_pipeline_e2e.py) and a mismatch between
two paths that should agree shows.

The file is made once per code version and machine and cached under ``.pytest_cache`` (both
pytest-xdist workers wait on one lock and share it): about 20 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path


CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "foodtransfer"


def _version() -> str:
    """What the weights depend on: this file, the sample generator, the pretraining, Keras'
    version."""
    import keras

    digest = hashlib.sha256()
    package = Path(__file__).parents[1] / "src" / "foodtransfer"
    for source in (Path(__file__), package / "data" / "sample.py",
                   package / "models" / "sample_weights.py"):
        digest.update(source.read_bytes())
    digest.update(keras.__version__.encode())
    return digest.hexdigest()[:12]


def _make(path: Path) -> None:
    """``foodtransfer sample-weights <path>``, as a user runs it (in this process)."""
    from typer.testing import CliRunner

    from foodtransfer.cli import app

    result = CliRunner().invoke(app, ["sample-weights", str(path)])
    assert result.exit_code == 0 and path.is_file(), result.output
    assert f"wrote {path}: MobileNetV2 pretrained on 8 generated classes" in result.output


def standin_weights() -> Path:
    """The cached stand-in weights file, made first where missing (one maker at a time)."""
    path = CACHE / f"standin-mobilenetv2-{_version()}.weights.h5"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "standin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                _make(path)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    return path


if __name__ == "__main__":
    print(standin_weights())
