"""Stage ``trim``: keep the chosen classes and numbers of images, decoding each exactly once.

For each class, the ids of the official train (and test) list are shuffled with a RNG seeded by
``seed`` and the class name, then decoded in that order until ``samples_per_class`` (and
``test_per_class``) images decode; unreadable files are skipped, reported with the reason, and
replaced by the next in the order. Same seed, same files, on any machine and any core count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd

from foodtransfer.atomic import atomic_dir
from foodtransfer.config import Params
from foodtransfer.data import food101
from foodtransfer.data.images import Decoded, ImageStoreWriter, decode_image
from foodtransfer.errors import DataError
from foodtransfer.progress import progress

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "test": 1}
WINDOW = 64  # images decoded ahead at most: bounds memory whatever the dataset size


@dataclass
class TrimResult:
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images kept
    skipped: int


def read_meta_list(raw_dir: Path, split: str) -> dict[str, list[str]]:
    """``meta/<split>.txt`` as class -> sorted ids (``<class>/<id>``)."""
    path = raw_dir / food101.META_DIR / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: the download stage output is incomplete. Run "
                        "'dvc repro download' again.")
    by_class: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            by_class.setdefault(line.split("/", 1)[0], []).append(line)
    return {name: sorted(ids) for name, ids in by_class.items()}


def resolve_classes(raw_dir: Path, classes: list[str] | Literal["all"]) -> list[str]:
    path = raw_dir / food101.META_DIR / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro download' again.")
    listed = path.read_text().split()
    if classes == "all":
        return listed
    missing = [c for c in classes if c not in listed]
    if missing:
        raise DataError(f"class(es) {', '.join(missing)} are not in {path}. Fix data.classes.")
    return list(classes)


def shuffled(ids: list[str], seed: int, class_name: str, split: str) -> list[str]:
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode()), SPLITS[split]])
    return [ids[i] for i in rng.permutation(len(ids))]


def _decode(image_id: str, images_dir: Path, size: int) -> Decoded:
    return decode_image(images_dir / f"{image_id}.jpg", size)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the stage process dies, even by SIGKILL.

    A killed stage cannot shut its pool down, and a forked worker never sees its task queue
    close (it holds both ends of the pipe): it would wait forever, holding memory and the
    stage's stdout and stderr open (so whoever waits on them, DVC included, hangs too)."""
    import signal
    import sys

    if sys.platform.startswith("linux"):  # the kernel kills us when the parent dies
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # SIGTERM to the whole process group: the stage process stops the pool (cancelling what
    # is queued, letting each worker finish its image) and cleans up; workers ignore it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def trim(raw_dir: Path, out_dir: Path, *, classes: list[str] | Literal["all"],
         samples_per_class: int | Literal["all"], test_per_class: int | Literal["all"],
         allow_fewer: bool, image_size: int, seed: int, workers: int | None = None,
         show_progress: bool = True) -> TrimResult:
    """Write ``out_dir/{train,test}.{npy,csv}``, ``classes.json`` and ``report.csv``."""
    class_names = resolve_classes(raw_dir, classes)
    images_dir = raw_dir / food101.IMAGES_DIR
    wanted = {"train": samples_per_class, "test": test_per_class}
    lists = {split: read_meta_list(raw_dir, split) for split in SPLITS}
    for split, by_class in lists.items():
        absent = [c for c in class_names if c not in by_class]
        if absent:
            raise DataError(f"class(es) {', '.join(absent)} have no entries in meta/{split}.txt "
                            "of the archive. Fix data.classes or the archive.")
    workers = workers or os.cpu_count() or 1
    report: list[dict[str, str]] = []
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    total = sum(len(lists[s][c]) if wanted[s] == "all" else min(int(wanted[s]), len(lists[s][c]))
                for s in SPLITS for c in class_names)
    decode = partial(_decode, images_dir=images_dir, size=image_size)
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    # An executor, not multiprocessing.Pool: Pool.__exit__ terminates its workers, which can
    # deadlock on the task queue's lock; the executor's shutdown waits for them cleanly.
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent,
                               initargs=(os.getpid(),))
    with atomic_dir(out_dir) as tmp, pool, \
            progress(total=total, desc="decoded images", unit="images", enabled=show_progress) as bar:
        for split in SPLITS:
            rows = []
            with ImageStoreWriter(tmp / f"{split}.npy", image_size) as writer:
                for label, class_name in enumerate(class_names):
                    order = shuffled(lists[split][class_name], seed, class_name, split)
                    need = len(order) if wanted[split] == "all" else int(wanted[split])
                    kept, position = 0, 0
                    while kept < need and position < len(order):
                        window = order[position:position + min(need - kept, WINDOW)]
                        position += len(window)
                        for image_id, decoded in zip(window, pool.map(decode, window, chunksize=4)):
                            if decoded.pixels is None:
                                report.append({"split": split, "image_id": image_id,
                                               "action": "skipped", "reason": decoded.reason})
                                continue
                            if decoded.reason:
                                report.append({"split": split, "image_id": image_id,
                                               "action": "kept", "reason": decoded.reason})
                            rows.append({"index": writer.append(decoded.pixels),
                                         "image_id": image_id, "class_name": class_name,
                                         "label": label})
                            kept += 1
                            bar.update(1)
                    counts[split][class_name] = kept
                    # "all" asks for every usable image: skipped files are no shortfall.
                    short = kept < need and (wanted[split] != "all" or kept == 0)
                    if short and not allow_fewer:
                        skipped = sum(1 for r in report if r["action"] == "skipped"
                                      and r["image_id"].startswith(f"{class_name}/")
                                      and r["split"] == split)
                        raise DataError(
                            f"class {class_name!r} has only {kept} usable images in the official "
                            f"{split} list ({len(order)} listed, {skipped} unreadable), but "
                            f"{'data.samples_per_class' if split == 'train' else 'data.test_per_class'}"
                            f" = {need}. Lower it, or set data.allow_fewer=true to keep what there is."
                        )
            pd.DataFrame(rows, columns=["index", "image_id", "class_name", "label"]).to_csv(
                tmp / f"{split}.csv", index=False)
        pd.DataFrame(report, columns=["split", "image_id", "action", "reason"]).to_csv(
            tmp / "report.csv", index=False)
        (tmp / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
    skipped = sum(1 for r in report if r["action"] == "skipped")
    for entry in report:
        log.warning("%s %s: %s (%s)", entry["split"], entry["image_id"], entry["action"],
                    entry["reason"])
    return TrimResult(class_names, counts, skipped)


def run(params: Params, raw: Path, out: Path) -> str:
    data = params.data
    result = trim(raw, out, classes=data.classes, samples_per_class=data.samples_per_class,
                  test_per_class=data.test_per_class, allow_fewer=data.allow_fewer,
                  image_size=params.image_size, seed=data.seed)
    train = sum(result.counts["train"].values())
    test = sum(result.counts["test"].values())
    return (f"decoded {train} train + {test} test images of {len(result.classes)} classes at "
            f"{params.image_size}px, skipped {result.skipped} unreadable (see {out}/report.csv)")
