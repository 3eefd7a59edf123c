"""Stage ``download``: fetch the Food-101 archive (or generate the offline sample), verify it
and extract ``meta/`` and the chosen classes' images.

The archive itself stays in the download cache (not a DVC output, so a cut download resumes);
see :mod:`foodtransfer.data.archive` and :mod:`foodtransfer.data.sample`.
"""

from __future__ import annotations

from pathlib import Path

from foodtransfer.config import Params
from foodtransfer.data import archive, food101


def run(params: Params, out: Path, cache: Path) -> str:
    data = params.data
    classes = None if data.classes == "all" else list(data.classes)
    if data.source == "sample":
        from foodtransfer.data.sample import build_sample_archive

        # "all" on the sample means all 101 Food-101 classes, as on the real archive: the
        # full dataset's shape runs offline (with few images per class, see data.sample).
        sample_classes = classes or list(food101.CLASSES)
        path = cache / f"food-101-sample-seed{data.seed}.tar.gz"
        build_sample_archive(path, sample_classes, data.sample, data.seed)
        origin = f"generated sample {path}"
    else:
        path = archive.fetch_archive(data.url, data.md5, cache)
        origin = data.url
    counts = archive.extract(path, out, classes)
    return (f"extracted {sum(counts.values())} images of {len(counts)} classes and meta/ from "
            f"{origin} into {out}")
