"""The generated sample archive, trim (decoding, skipping bad files, determinism, atomic
output), the image store and the train/validation split."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import SAMPLE_CLASSES, SAMPLE_CONFIG, SAMPLE_SEED
from foodtransfer.data import food101
from foodtransfer.config import SampleConfig
from foodtransfer.errors import DataError
from foodtransfer.data.images import ImageStore, ImageStoreWriter, decode_image
from foodtransfer.data.sample import BAD_FILES, build_sample_archive
from foodtransfer.data.manifests import data_version
from foodtransfer.stages.split import split
from foodtransfer.stages.trim import shuffled, trim


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old")))


def run_trim(raw: Path, out: Path, **overrides) -> object:
    kwargs = dict(classes=list(SAMPLE_CLASSES), samples_per_class=10, test_per_class=3,
                  allow_fewer=False, image_size=16, seed=SAMPLE_SEED, workers=1,
                  show_progress=False)
    kwargs.update(overrides)
    return trim(raw, out, **kwargs)


# ------------------------------------------------------------------------- sample archive

TINY = SampleConfig(train_per_class=4, test_per_class=2, min_side=16, max_side=24)


def test_sample_archive_is_deterministic(tmp_path: Path) -> None:
    classes = ["pizza", "sushi"]
    a = tmp_path / "a.tar.gz"
    counts = build_sample_archive(a, classes, TINY, 1, show_progress=False)
    first = a.read_bytes()
    build_sample_archive(a, classes, TINY, 1, show_progress=False)  # same path, again
    b = tmp_path / "b" / "b.tar.gz"
    build_sample_archive(b, classes, TINY, 1, show_progress=False)  # another path
    c = tmp_path / "c.tar.gz"
    build_sample_archive(c, classes, TINY, 2, show_progress=False)
    assert counts == {"pizza": 6, "sushi": 6}
    assert a.read_bytes() == first
    assert b.read_bytes() == first
    assert md5_file(a) != md5_file(c)
    assert leftovers(tmp_path) == []  # written atomically, no temporary file left


def test_sample_archive_has_the_official_layout_and_the_bad_files(sample_archive: Path) -> None:
    n_train, n_test = SAMPLE_CONFIG.train_per_class, SAMPLE_CONFIG.test_per_class
    with tarfile.open(sample_archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    meta = {name.rsplit("/", 1)[1]: data.decode() for name, data in members.items()
            if name.startswith(food101.META_DIR + "/")}
    assert sorted(meta) == sorted(food101.META_FILES)
    assert meta["classes.txt"].split() == SAMPLE_CLASSES
    assert meta["labels.txt"].splitlines() == ["Pizza", "Sushi", "Tacos"]
    train = meta["train.txt"].split()
    test = meta["test.txt"].split()
    assert len(train) == n_train * len(SAMPLE_CLASSES) and len(test) == n_test * len(SAMPLE_CLASSES)
    assert not set(train) & set(test)
    assert json.loads(meta["train.json"]) == {c: [i for i in train if i.startswith(c + "/")]
                                              for c in SAMPLE_CLASSES}
    assert sum(len(v) for v in json.loads(meta["test.json"]).values()) == len(test)

    images = {name for name in members if name.startswith(food101.IMAGES_DIR + "/")}
    assert images == {f"{food101.IMAGES_DIR}/{i}.jpg" for i in train + test}
    for name in images:
        assert len(name.split("/")) == 4  # food-101/images/<class>/<id>.jpg

    # The planted bad files, at their documented places in each class's sorted train list.
    by_class = {c: sorted(i for i in train if i.startswith(c + "/")) for c in SAMPLE_CLASSES}
    kinds = {}
    for class_index, position, kind in BAD_FILES:
        image_id = by_class[SAMPLE_CLASSES[class_index]][position]
        kinds[kind] = members[f"{food101.IMAGES_DIR}/{image_id}.jpg"]
    assert kinds["empty"] == b""
    assert kinds["truncated"][:2] == b"\xff\xd8" and not kinds["truncated"].endswith(b"\xff\xd9")
    assert kinds["png"][:8] == b"\x89PNG\r\n\x1a\n"
    good = [data for name, data in members.items()
            if name in images and data not in kinds.values()]
    assert good and all(data[:2] == b"\xff\xd8" and data.endswith(b"\xff\xd9") for data in good)
    # Sizes stay within min_side..max_side.
    for data in good[:10]:
        with Image.open(io.BytesIO(data)) as image:
            assert all(SAMPLE_CONFIG.min_side <= s <= SAMPLE_CONFIG.max_side for s in image.size)


def test_sample_archive_is_a_plain_gzip(sample_archive: Path) -> None:
    assert sample_archive.read_bytes()[:2] == b"\x1f\x8b"
    # No FNAME field: the header must not carry the random temporary file name.
    assert sample_archive.read_bytes()[3] & 0x08 == 0
    assert len(gzip.decompress(sample_archive.read_bytes())) % 512 == 0


# ----------------------------------------------------------------------------------- trim

def test_trim_writes_the_expected_outputs(sample_trimmed_dir: Path) -> None:
    out = sample_trimmed_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "report.csv", "test.csv", "test.npy", "train.csv", "train.npy"]
    assert json.loads((out / "classes.json").read_text()) == SAMPLE_CLASSES
    for split_name, per_class in (("train", 10), ("test", 3)):
        frame = pd.read_csv(out / f"{split_name}.csv")
        assert list(frame.columns) == ["index", "image_id", "class_name", "label"]
        assert frame["index"].tolist() == list(range(len(frame)))
        assert frame["class_name"].value_counts().to_dict() == {c: per_class
                                                                 for c in SAMPLE_CLASSES}
        assert (frame["label"] == frame["class_name"].map(SAMPLE_CLASSES.index)).all()
        assert frame["image_id"].is_unique
        assert all(i.startswith(f"{c}/") for i, c in zip(frame["image_id"], frame["class_name"]))
        store = np.load(out / f"{split_name}.npy", mmap_mode="r")
        assert store.shape == (len(frame), 16, 16, 3) and store.dtype == np.uint8


def test_trim_picks_the_seeded_order_and_skips_bad_files(sample_raw_dir: Path,
                                                        sample_trimmed_dir: Path) -> None:
    train_list = (sample_raw_dir / food101.META_DIR / "train.txt").read_text().split()
    test_list = (sample_raw_dir / food101.META_DIR / "test.txt").read_text().split()
    train = pd.read_csv(sample_trimmed_dir / "train.csv")
    test = pd.read_csv(sample_trimmed_dir / "test.csv")
    report = pd.read_csv(sample_trimmed_dir / "report.csv")
    skipped = set(report.loc[report["action"] == "skipped", "image_id"])
    for class_name in SAMPLE_CLASSES:
        ids = sorted(i for i in test_list if i.startswith(class_name + "/"))
        expected = shuffled(ids, SAMPLE_SEED, class_name, "test")[:3]
        assert test.loc[test["class_name"] == class_name, "image_id"].tolist() == expected
        ids = sorted(i for i in train_list if i.startswith(class_name + "/"))
        order = [i for i in shuffled(ids, SAMPLE_SEED, class_name, "train") if i not in skipped]
        assert train.loc[train["class_name"] == class_name, "image_id"].tolist() == order[:10]
    # pizza holds the empty and the truncated file; with 10 of its 12 needed, both were met.
    pizza = sorted(i for i in train_list if i.startswith("pizza/"))
    assert skipped == {pizza[0], pizza[1]}
    reasons = dict(zip(report["image_id"], report["reason"]))
    assert reasons[pizza[0]] == "empty file (0 bytes)"
    assert reasons[pizza[1]].startswith("corrupt or truncated image")


def test_trim_stores_the_decoded_pixels(sample_raw_dir: Path, sample_trimmed_dir: Path) -> None:
    frame = pd.read_csv(sample_trimmed_dir / "test.csv")
    store = np.load(sample_trimmed_dir / "test.npy")
    for row in frame.itertuples():
        decoded = decode_image(sample_raw_dir / food101.IMAGES_DIR / f"{row.image_id}.jpg", 16)
        np.testing.assert_array_equal(store[row.index], decoded.pixels)


def test_trim_is_deterministic(sample_raw_dir: Path, sample_trimmed_dir: Path,
                               tmp_path: Path) -> None:
    out = tmp_path / "again"
    run_trim(sample_raw_dir, out)
    for name in ("train.csv", "test.csv", "report.csv", "classes.json", "train.npy", "test.npy"):
        assert (out / name).read_bytes() == (sample_trimmed_dir / name).read_bytes(), name


def test_trim_output_does_not_depend_on_the_worker_count(sample_raw_dir: Path,
                                                         tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    run_trim(sample_raw_dir, one, samples_per_class=9, test_per_class=4, workers=1)
    run_trim(sample_raw_dir, two, samples_per_class=9, test_per_class=4, workers=2)
    for name in ("train.csv", "test.csv", "report.csv", "train.npy", "test.npy"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_trim_another_seed_picks_other_images(sample_raw_dir: Path, sample_trimmed_dir: Path,
                                              tmp_path: Path) -> None:
    run_trim(sample_raw_dir, tmp_path / "other", seed=SAMPLE_SEED + 1)
    ours = pd.read_csv(sample_trimmed_dir / "train.csv")["image_id"].tolist()
    theirs = pd.read_csv(tmp_path / "other" / "train.csv")["image_id"].tolist()
    assert ours != theirs


def test_trim_all_keeps_every_usable_image(sample_raw_dir: Path, tmp_path: Path) -> None:
    result = run_trim(sample_raw_dir, tmp_path / "all", samples_per_class="all",
                      test_per_class="all")
    n_train, n_test = SAMPLE_CONFIG.train_per_class, SAMPLE_CONFIG.test_per_class
    # pizza loses its empty and truncated file; sushi's PNG-named-.jpg is decoded and kept.
    assert result.counts["train"] == {"pizza": n_train - 2, "sushi": n_train, "tacos": n_train}
    assert result.counts["test"] == {c: n_test for c in SAMPLE_CLASSES}
    assert result.skipped == 2
    report = pd.read_csv(tmp_path / "all" / "report.csv")
    kept = report[report["action"] == "kept"]
    assert len(kept) == 1 and kept["image_id"].iloc[0].startswith("sushi/")
    assert kept["reason"].iloc[0] == "PNG data in a .jpg file (decoded anyway)"


def test_trim_all_classes_from_classes_txt(sample_raw_dir: Path, tmp_path: Path) -> None:
    result = run_trim(sample_raw_dir, tmp_path / "out", classes="all", samples_per_class=2,
                      test_per_class=1)
    assert result.classes == SAMPLE_CLASSES


def test_trim_unknown_class_is_a_data_error(sample_raw_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="hamburger"):
        run_trim(sample_raw_dir, tmp_path / "out", classes=["pizza", "hamburger"])
    assert not (tmp_path / "out").exists()


def test_trim_missing_meta_list(sample_raw_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw_dir, raw)
    (raw / food101.META_DIR / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        run_trim(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ trim on hand-made bad files

def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (30, 20), mode: str = "RGB",
          fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) * 2 // 3]


# pizza's train list: id -> (file bytes or None for "listed but absent", expected outcome)
BAD_TRAIN = {
    "pizza/1": (_jpeg((200, 40, 40)), "good"),
    "pizza/2": (_jpeg((40, 200, 40)), "good"),
    "pizza/3": (_jpeg((40, 40, 200)), "good"),
    "pizza/10": (b"", "skipped:empty file (0 bytes)"),
    "pizza/11": (_truncated_jpeg(), "skipped:corrupt or truncated image"),
    "pizza/12": (_jpeg((10, 20, 250), fmt="PNG"), "kept:PNG data in a .jpg file"),
    "pizza/13": (_jpeg((30, 160, 90), mode="CMYK"), "good"),
    "pizza/14": (_jpeg((128, 128, 128), mode="L"), "good"),
    "pizza/15": (b"this is a text file, not a photo\n", "skipped:not an image"),
    "pizza/16": (None, "skipped:file not found"),
    "pizza/17": (None, "huge"),  # written by the fixture: 6000 x 6000 px
}
PIZZA_USABLE = 7  # 3 good, PNG, CMYK, grayscale, huge


@pytest.fixture(scope="module")
def bad_raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Food-101-layout folder (as extracted) whose pizza train list holds broken files."""
    raw = tmp_path_factory.mktemp("bad_raw") / "raw"
    images = raw / food101.IMAGES_DIR
    files = {image_id: data for image_id, (data, _) in BAD_TRAIN.items() if data is not None}
    sushi_train = [f"sushi/{i}" for i in range(1, 5)]
    tacos_train = ["tacos/1", "tacos/2"]  # both unreadable
    test_ids = ["pizza/100", "pizza/101", "sushi/100", "sushi/101", "tacos/100"]
    for n, image_id in enumerate(sushi_train + test_ids):
        files[image_id] = _jpeg((20 * n, 100, 150))
    files.update({"tacos/1": b"", "tacos/2": b"GIF89a nonsense"})
    for image_id, data in files.items():
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        (images / f"{image_id}.jpg").write_bytes(data)
    Image.new("RGB", (6000, 6000), (200, 120, 30)).save(images / "pizza" / "17.jpg",
                                                          quality=90)
    meta = raw / food101.META_DIR
    meta.mkdir(parents=True)
    (meta / "classes.txt").write_text("pizza\nsushi\ntacos\n")
    (meta / "train.txt").write_text(
        "".join(f"{i}\n" for i in [*BAD_TRAIN, *sushi_train, *tacos_train]))
    (meta / "test.txt").write_text("".join(f"{i}\n" for i in test_ids))
    return raw


def trim_bad(raw: Path, out: Path, **overrides) -> object:
    kwargs = dict(classes=["pizza", "sushi"], samples_per_class="all", test_per_class="all",
                  allow_fewer=False, image_size=24, seed=0, workers=2, show_progress=False)
    kwargs.update(overrides)
    return trim(raw, out, **kwargs)


def test_bad_files_are_decoded_or_skipped_and_reported(bad_raw_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "trimmed"
    result = trim_bad(bad_raw_dir, out)
    assert result.counts["train"] == {"pizza": PIZZA_USABLE, "sushi": 4}
    assert result.counts["test"] == {"pizza": 2, "sushi": 2}
    report = pd.read_csv(out / "report.csv")
    assert (report["split"] == "train").all()
    outcome = {row.image_id: f"{row.action}:{row.reason}" for row in report.itertuples()}
    expected = {i: e for i, (_, e) in BAD_TRAIN.items() if e.startswith(("skipped", "kept"))}
    assert sorted(outcome) == sorted(expected)
    for image_id, text in expected.items():
        assert outcome[image_id].startswith(text), (image_id, outcome[image_id])
    assert result.skipped == 4

    train = pd.read_csv(out / "train.csv")
    pixels = np.load(out / "train.npy")
    kept = set(train["image_id"])
    assert kept == {i for i, (_, e) in BAD_TRAIN.items() if not e.startswith("skipped")} | {
        f"sushi/{i}" for i in range(1, 5)}

    def image_of(image_id: str) -> np.ndarray:
        return pixels[train.loc[train["image_id"] == image_id, "index"].item()].astype(int)

    def assert_colour(image_id: str, rgb: tuple[int, int, int]) -> None:
        image = image_of(image_id)
        assert image.shape == (24, 24, 3)
        assert np.abs(image - np.array(rgb)).max() <= 6, (image_id, image.mean(axis=(0, 1)))

    assert_colour("pizza/1", (200, 40, 40))
    assert_colour("pizza/12", (10, 20, 250))  # PNG under a .jpg name
    assert_colour("pizza/13", (30, 160, 90))  # CMYK JPEG
    assert_colour("pizza/14", (128, 128, 128))  # grayscale JPEG, now three equal channels
    assert_colour("pizza/17", (200, 120, 30))  # 6000 x 6000 px, decoded at reduced scale


def test_fewer_usable_images_than_asked_is_a_data_error(bad_raw_dir: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "trimmed"
    with pytest.raises(DataError) as info:
        trim_bad(bad_raw_dir, out, samples_per_class=PIZZA_USABLE + 1)
    message = str(info.value)
    assert "class 'pizza' has only 7 usable images" in message
    assert "11 listed, 4 unreadable" in message
    assert "data.samples_per_class = 8" in message
    assert "data.allow_fewer=true" in message
    # Interrupted: no output folder and no temporary folder left behind.
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_fewer_test_images_names_test_per_class(bad_raw_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        trim_bad(bad_raw_dir, tmp_path / "trimmed", samples_per_class=2, test_per_class=3)
    assert "data.test_per_class = 3" in str(info.value) and "'pizza'" in str(info.value)


def test_allow_fewer_keeps_what_there_is(bad_raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "trimmed"
    result = trim_bad(bad_raw_dir, out, samples_per_class=6, allow_fewer=True)
    assert result.counts["train"] == {"pizza": 6, "sushi": 4}
    train = pd.read_csv(out / "train.csv")
    assert train["class_name"].value_counts().to_dict() == {"pizza": 6, "sushi": 4}
    assert np.load(out / "train.npy").shape == (10, 24, 24, 3)


def test_all_with_no_usable_image_is_a_data_error(bad_raw_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        trim_bad(bad_raw_dir, tmp_path / "trimmed", classes=["sushi", "tacos"])
    message = str(info.value)
    assert "class 'tacos' has only 0 usable images" in message and "2 unreadable" in message
    assert not (tmp_path / "trimmed").exists()
    # allow_fewer accepts it (an empty class is then the user's explicit choice).
    result = trim_bad(bad_raw_dir, tmp_path / "trimmed", classes=["sushi", "tacos"],
                      allow_fewer=True)
    assert result.counts["train"] == {"sushi": 4, "tacos": 0}


def test_failed_trim_keeps_the_previous_output(bad_raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "trimmed"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(DataError):
        trim_bad(bad_raw_dir, out, samples_per_class=50)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- image store

def test_image_store_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    path = tmp_path / "store.npy"
    with ImageStoreWriter(path, 12) as writer:
        assert [writer.append(image) for image in images] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.load(path), images)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r")[3], images[3])
    store = ImageStore(path)
    assert len(store) == 5 and store.shape == (5, 12, 12, 3)
    np.testing.assert_array_equal(store.read([4, 0, 2]), images[[4, 0, 2]])
    with pytest.raises(IndexError):
        store.read([5])


def test_image_store_reads_a_numpy_written_file(tmp_path: Path) -> None:
    images = np.random.default_rng(4).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "plain.npy", images)
    np.testing.assert_array_equal(ImageStore(tmp_path / "plain.npy").read([2, 1]), images[[2, 1]])
    np.save(tmp_path / "floats.npy", images.astype(np.float32))
    with pytest.raises(ValueError, match="not a uint8"):
        ImageStore(tmp_path / "floats.npy")


def test_empty_image_store(tmp_path: Path) -> None:
    with ImageStoreWriter(tmp_path / "empty.npy", 16):
        pass
    assert np.load(tmp_path / "empty.npy").shape == (0, 16, 16, 3)
    assert len(ImageStore(tmp_path / "empty.npy")) == 0


def test_image_store_writer_rejects_the_wrong_shape(tmp_path: Path) -> None:
    with ImageStoreWriter(tmp_path / "s.npy", 8) as writer:
        with pytest.raises(ValueError, match="expected uint8"):
            writer.append(np.zeros((8, 8), dtype=np.uint8))
        with pytest.raises(ValueError, match="expected uint8"):
            writer.append(np.zeros((8, 8, 3), dtype=np.float32))
        writer.append(np.full((8, 8, 3), 9, dtype=np.uint8))
    assert np.load(tmp_path / "s.npy").tolist() == np.full((1, 8, 8, 3), 9).tolist()


# ----------------------------------------------------------------------------------- split

def run_split(trimmed: Path, root: Path, seed: int = SAMPLE_SEED, val_fraction: float = 0.2):
    out, metrics = root / "split", root / "metrics" / "split.json"
    counts = split(trimmed, out, metrics, val_fraction=val_fraction, seed=seed)
    return out, metrics, counts


def test_split_is_stratified_and_complete(sample_trimmed_dir: Path, tmp_path: Path) -> None:
    out, metrics, counts = run_split(sample_trimmed_dir, tmp_path)
    assert counts == {"train": {c: 8 for c in SAMPLE_CLASSES},
                      "val": {c: 2 for c in SAMPLE_CLASSES},
                      "test": {c: 3 for c in SAMPLE_CLASSES}}
    frames = {name: pd.read_csv(out / f"{name}.csv") for name in ("train", "val", "test")}
    for frame in frames.values():
        assert list(frame.columns) == ["store", "index", "image_id", "class_name", "label"]
    trimmed_train = pd.read_csv(sample_trimmed_dir / "train.csv")
    trimmed_test = pd.read_csv(sample_trimmed_dir / "test.csv")
    # train and val partition the trimmed train images; test is the trimmed test list.
    assert not set(frames["train"]["image_id"]) & set(frames["val"]["image_id"])
    assert (set(frames["train"]["image_id"]) | set(frames["val"]["image_id"])
            == set(trimmed_train["image_id"]))
    assert (frames["train"]["store"] == "train").all() and (frames["val"]["store"] == "train").all()
    assert (frames["test"]["store"] == "test").all()
    assert frames["test"]["image_id"].tolist() == trimmed_test["image_id"].tolist()
    # Each row's index still points at its image in the store it names.
    by_id = trimmed_train.set_index("image_id")["index"]
    for frame in (frames["train"], frames["val"]):
        assert (frame["index"] == frame["image_id"].map(by_id)).all()
        assert frame["index"].is_monotonic_increasing
    summary = json.loads(metrics.read_text())
    assert summary == {"train_images": 24, "val_images": 6, "test_images": 9, "classes": 3}
    assert json.loads((out / "counts.json").read_text()) == counts  # beside the manifests


def test_split_is_deterministic_and_seeded(sample_trimmed_dir: Path, tmp_path: Path) -> None:
    a, _, _ = run_split(sample_trimmed_dir, tmp_path / "a")
    b, _, _ = run_split(sample_trimmed_dir, tmp_path / "b")
    c, _, _ = run_split(sample_trimmed_dir, tmp_path / "c", seed=SAMPLE_SEED + 1)
    for name in ("train.csv", "val.csv", "test.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert data_version(a) == data_version(b)
    assert len(data_version(a)) == 12
    assert (a / "val.csv").read_bytes() != (c / "val.csv").read_bytes()
    assert data_version(a) != data_version(c)


def test_split_val_fraction_too_small_is_a_data_error(sample_trimmed_dir: Path,
                                                      tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.val_fraction = 0.05"):
        run_split(sample_trimmed_dir, tmp_path, val_fraction=0.05)  # 1.5 val images, 3 classes
    assert not (tmp_path / "split").exists()
    assert not (tmp_path / "metrics").exists()


def test_split_val_fraction_too_large_is_a_data_error(sample_trimmed_dir: Path,
                                                      tmp_path: Path) -> None:
    # 30 images, 3 classes: a 0.95 share leaves 1 training image for 3 classes.
    with pytest.raises(DataError, match="data.val_fraction = 0.95"):
        run_split(sample_trimmed_dir, tmp_path, val_fraction=0.95)
    assert not (tmp_path / "split").exists()


def test_decode_rules_for_what_is_not_a_plain_photo(tmp_path: Path) -> None:
    """16-bit grey is scaled to 8 bits (not clipped to white); 32-bit integer pixels, an
    animated GIF and EPS are refused undecoded; the pixel limit holds at its boundary."""
    import io

    from PIL import Image

    from foodtransfer.data.images import MAX_PIXELS, too_many_pixels

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    grey16 = Image.fromarray(np.full((8, 8), 40_000, np.uint16))  # mode I;16
    decoded = decode_image(encoded(grey16, "PNG"), 8)
    assert decoded.pixels is not None and (decoded.pixels == 40_000 >> 8).all()
    wide = Image.fromarray(np.full((8, 8), 7, np.int32), "I")
    refused = decode_image(encoded(wide, "TIFF"), 8)
    assert refused.pixels is None and "32-bit 'I' pixels" in refused.reason
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    animated = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    refused = decode_image(animated, 8)
    assert refused.pixels is None and "an animated GIF (2 frames)" in refused.reason
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    refused = decode_image(eps, 8)
    assert refused.pixels is None and "not an image in a photo format" in refused.reason
    assert too_many_pixels(6_000, 10_000) is None and 6_000 * 10_000 == MAX_PIXELS
    assert "(60 MP), over the limit of 60 MP" in too_many_pixels(6_001, 10_000)
