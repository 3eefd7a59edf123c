"""One function per DVC stage: what each `pipeline/<stage>.py` script calls.

Each takes the validated params and paths, does the work through the package's modules and
returns the stage's one-line summary.
"""

from __future__ import annotations

from pathlib import Path

from foodtransfer import food101
from foodtransfer.config import Params


def run_download(params: Params, out: Path, cache: Path) -> str:
    from foodtransfer import download

    data = params.data
    classes = None if data.classes == "all" else list(data.classes)
    if data.source == "sample":
        from foodtransfer.sample import build_sample_archive

        # "all" on the sample means all 101 Food-101 classes, as on the real archive: the
        # full dataset's shape runs offline (with few images per class, see data.sample).
        sample_classes = classes or list(food101.CLASSES)
        archive = cache / f"food-101-sample-seed{params.seed}.tar.gz"
        build_sample_archive(archive, sample_classes, data.sample, params.seed)
        origin = f"generated sample {archive}"
    else:
        archive = download.fetch_archive(data.url, data.md5, cache)
        origin = data.url
    counts = download.extract(archive, out, classes)
    return (f"extracted {sum(counts.values())} images of {len(counts)} classes and meta/ from "
            f"{origin} into {out}")


def run_trim(params: Params, raw: Path, out: Path) -> str:
    from foodtransfer.trim import trim

    data = params.data
    result = trim(raw, out, classes=data.classes, samples_per_class=data.samples_per_class,
                  test_per_class=data.test_per_class, allow_fewer=data.allow_fewer,
                  image_size=params.image_size, seed=params.seed)
    train = sum(result.counts["train"].values())
    test = sum(result.counts["test"].values())
    return (f"decoded {train} train + {test} test images of {len(result.classes)} classes at "
            f"{params.image_size}px, skipped {result.skipped} unreadable (see {out}/report.csv)")


def run_split(params: Params, trimmed: Path, out: Path, metrics: Path) -> str:
    from foodtransfer.split import data_version, split

    counts = split(trimmed, out, metrics, val_fraction=params.data.val_fraction,
                   seed=params.seed)
    sizes = ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())
    return f"{sizes} images; data version {data_version(out)}; manifests in {out}"
