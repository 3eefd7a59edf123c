"""The training loop (early stopping, schedules, history), test-set evaluation, and the data
path into the models: the tf.data image pipeline and feature extraction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from foodtransfer.data.datasets import image_dataset, npy_dataset
from foodtransfer.data.images import ImageStore, ImageStoreWriter, NpyWriter
from foodtransfer.data.manifests import Split
from foodtransfer.errors import DataError
from foodtransfer.evaluation import evaluate
from foodtransfer.models.classifiers import build_head
from foodtransfer.models.inference import compile_forward, predict_array
from foodtransfer.stages.features import extract_features, feature_files
from foodtransfer.training.loop import History, fit, make_optimizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    keras.utils.set_random_seed(1234)


def blobs(n: int, seed: int, classes: int = 3, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around ``classes`` well separated centres (the same centres for any seed)."""
    centres = np.random.default_rng(0).normal(0, 3, (classes, dim))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = centres[y] + rng.normal(0, 1, (n, dim))
    return x.astype("float32"), y.astype("int64")


def noise(n: int, seed: int, classes: int = 3, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Features with random labels: nothing to learn, validation loss only gets worse."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, dim)).astype("float32"),
            rng.integers(0, classes, n).astype("int64"))


def run_fit(train, val, **overrides) -> tuple[keras.Model, History]:
    head = build_head(train[0].shape[1], 3)
    kwargs = dict(epochs=30, learning_rate=0.01, optimizer="adam", lr_schedule="none",
                  patience=30, num_classes=3, train_examples=len(train[0]), batch_size=16,
                  seed=0)
    kwargs.update(overrides)
    return head, fit(head, train, val, **kwargs)


# --------------------------------------------------------------------------------- fitting

def test_fit_learns_separable_features_and_numbers_epochs_from_first_epoch() -> None:
    seen: list[dict] = []
    head, history = run_fit(blobs(60, 1), blobs(30, 2), first_epoch=5, on_epoch=seen.append,
                            keep_epoch="val_loss")
    assert history.epochs_run == 30
    assert [row["epoch"] for row in history.rows] == list(range(5, 35))
    assert seen == history.rows
    assert {"loss", "accuracy", "top5", "val_loss", "val_accuracy", "learning_rate"} \
        <= set(history.rows[0])
    assert max(row["val_accuracy"] for row in history.rows) > 0.9
    losses = [row["val_loss"] for row in history.rows]
    assert history.best_epoch() == 5 + int(np.argmin(losses))
    assert losses[-1] < losses[0]
    assert len(history.epoch_seconds) == 30 and history.seconds_per_epoch > 0
    # The model handed back is trained: it classifies unseen points.
    x_test, y_test = blobs(30, 3)
    assert np.mean(predict_array(head, x_test).argmax(1) == y_test) > 0.9


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights() -> None:
    train, val = noise(48, 1), noise(48, 2)
    head, history = run_fit(train, val, epochs=50, patience=3, learning_rate=0.05,
                            keep_epoch="val_loss")
    assert history.epochs_run < 50
    best = history.best_epoch()
    last = history.rows[-1]["epoch"]
    assert last == best + 3  # stopped `patience` epochs after the best one
    best_loss = min(row["val_loss"] for row in history.rows)
    assert history.rows[-1]["val_loss"] > best_loss + 1e-3  # restoring makes a difference
    restored = head.evaluate(*val, batch_size=16, verbose=0, return_dict=True)["loss"]
    assert restored == pytest.approx(best_loss, abs=1e-4)


def test_plateau_schedule_reduces_the_learning_rate() -> None:
    _, history = run_fit(noise(48, 1), noise(48, 2), epochs=30, patience=4, learning_rate=0.05,
                         lr_schedule="plateau")
    rates = [row["learning_rate"] for row in history.rows]
    assert rates[0] == pytest.approx(0.05)
    assert min(rates) < 0.05
    assert all(b <= a for a, b in zip(rates, rates[1:]))
    for rate in rates:  # every reduction is by the factor 0.2
        steps = math.log(rate / 0.05) / math.log(0.2)
        assert steps == pytest.approx(round(steps), abs=1e-3)


def test_cosine_schedule_decays_to_zero_over_the_run() -> None:
    epochs, steps = 8, math.ceil(60 / 16)
    _, history = run_fit(blobs(60, 1), blobs(30, 2), epochs=epochs, patience=100,
                         learning_rate=0.01, lr_schedule="cosine")
    rates = [row["learning_rate"] for row in history.rows]
    assert len(rates) == epochs
    assert all(b < a for a, b in zip(rates, rates[1:]))
    # Recorded as the rate the epoch trains with: epoch e starts at step (e - 1) * steps.
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    np.testing.assert_allclose(rates, expected, atol=1e-6)
    assert steps == 4


def test_best_epoch_is_the_first_epoch_with_the_lowest_validation_loss() -> None:
    rows = [{"epoch": 7, "val_loss": 0.5}, {"epoch": 8, "val_loss": 0.3},
            {"epoch": 9, "val_loss": 0.3}, {"epoch": 10, "val_loss": 0.4}]
    assert History(rows=rows, keep_epoch="val_loss").best_epoch() == 8
    assert History().best_epoch() == 0
    assert History().seconds_per_epoch == 0.0


def test_each_rule_keeps_its_epoch_and_says_why() -> None:
    """The fine-tune's case: the loss is lowest early, the accuracy best later."""
    rows = [{"epoch": 4, "val_loss": 0.92, "val_accuracy": 0.733},
            {"epoch": 6, "val_loss": 0.95, "val_accuracy": 0.768},
            {"epoch": 8, "val_loss": 0.93, "val_accuracy": 0.768},  # tie: the lower loss
            {"epoch": 10, "val_loss": 0.98, "val_accuracy": 0.761}]
    assert History(rows=rows, keep_epoch="val_loss").best_epoch() == 4
    assert History(rows=rows, keep_epoch="val_accuracy").best_epoch() == 8
    assert History(rows=rows, keep_epoch="last").best_epoch() == 10
    assert History(rows=rows).kept_line() == (
        "kept the weights of epoch 8 of 10: the best validation accuracy (ties: the lower "
        "validation loss) (val_accuracy 0.768, val_loss 0.9300)")


def test_keeping_by_validation_accuracy_restores_that_epochs_weights() -> None:
    train, val = noise(48, 1), noise(48, 2)
    head, history = run_fit(train, val, epochs=40, patience=4, learning_rate=0.05,
                            keep_epoch="val_accuracy")
    best = history.best_epoch()
    assert history.rows[-1]["epoch"] == best + 4 < 40  # stopped by the same rule
    kept = next(row for row in history.rows if row["epoch"] == best)
    restored = head.evaluate(*val, batch_size=16, verbose=0, return_dict=True)
    assert restored["accuracy"] == pytest.approx(kept["val_accuracy"], abs=1e-6)
    assert restored["loss"] == pytest.approx(kept["val_loss"], abs=1e-4)


def test_keeping_the_last_epoch_trains_every_epoch() -> None:
    head, history = run_fit(noise(48, 1), noise(48, 2), epochs=12, patience=2,
                            learning_rate=0.05, keep_epoch="last")
    assert history.epochs_run == 12 and history.best_epoch() == 12


@pytest.mark.parametrize(("name", "cls"), [("nadam", keras.optimizers.Nadam),
                                           ("adam", keras.optimizers.Adam),
                                           ("sgd", keras.optimizers.SGD),
                                           ("rmsprop", keras.optimizers.RMSprop)])
def test_make_optimizer(name: str, cls: type) -> None:
    optimizer = make_optimizer(name, 0.125)
    assert type(optimizer) is cls
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.125)
    scheduled = make_optimizer(name, 0.5, schedule="cosine", epochs=2, steps_per_epoch=5)
    assert isinstance(scheduled._learning_rate, keras.optimizers.schedules.CosineDecay)
    assert scheduled._learning_rate.decay_steps == 10
    assert float(keras.ops.convert_to_numpy(scheduled.learning_rate)) == pytest.approx(0.5)


def test_predict_array_batches_like_one_call() -> None:
    head = build_head(16, 3)
    x, _ = blobs(23, 1)
    expected = keras.ops.convert_to_numpy(head(x, training=False))
    np.testing.assert_allclose(predict_array(head, x, batch_size=5), expected, atol=1e-6)
    assert predict_array(head, x[:0]).shape == (0, 3)


# ------------------------------------------------------------------------------ evaluation

def test_evaluate_scores_a_hand_made_probability_matrix() -> None:
    names = ["a", "b", "c", "d"]  # class d never occurs and is never predicted
    p = np.array([[0.70, 0.20, 0.10, 0.00],   # true a, predicted a
                  [0.10, 0.60, 0.30, 0.00],   # true b, predicted b
                  [0.50, 0.40, 0.10, 0.00],   # true c, predicted a
                  [0.20, 0.30, 0.50, 0.00],   # true c, predicted c
                  [0.05, 0.90, 0.05, 0.00],   # true a, predicted b
                  [0.00, 0.40, 0.60, 0.00]])  # true a (p = 0), predicted c
    labels = np.array([0, 1, 2, 2, 0, 0])
    result = evaluate(p, labels, names)
    m = result.metrics
    assert set(m) == {"test_accuracy", "test_top5_accuracy", "test_macro_f1", "test_loss"}
    assert m["test_accuracy"] == pytest.approx(3 / 6)
    assert m["test_top5_accuracy"] == pytest.approx(1.0)  # 4 classes: top-5 is top-4
    # p = 0 is clipped to float64's epsilon, as scikit-learn's log_loss does.
    expected_loss = -np.mean(np.log([0.7, 0.6, 0.1, 0.5, 0.05, np.finfo(np.float64).eps]))
    assert m["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    # Per class (a, b, c, d): precision 1/2, 1/2, 1/2, 0; recall 1/3, 1, 1/2, 0.
    f1 = [2 * (1 / 2 * 1 / 3) / (1 / 2 + 1 / 3), 2 / 3, 1 / 2, 0.0]
    assert m["test_macro_f1"] == pytest.approx(np.mean(f1))
    assert m["test_macro_f1"] == pytest.approx(
        f1_score(labels, p.argmax(1), labels=[0, 1, 2, 3], average="macro", zero_division=0))
    np.testing.assert_array_equal(result.confusion, [[1, 1, 1, 0],
                                                     [0, 1, 0, 0],
                                                     [1, 0, 1, 0],
                                                     [0, 0, 0, 0]])
    np.testing.assert_array_equal(result.predicted, [0, 1, 0, 2, 1, 2])
    assert list(result.per_class) == names
    assert result.per_class["a"] == pytest.approx(
        {"precision": 0.5, "recall": 1 / 3, "f1": f1[0], "support": 3})
    assert result.per_class["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert "a" in result.report_text and "macro avg" in result.report_text


def test_evaluate_top5_with_more_than_five_classes_and_a_prefix() -> None:
    names = [f"c{i}" for i in range(7)]
    ranks = np.array([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # class i is ranked i-th
    p = np.tile(ranks / ranks.sum(), (4, 1))
    labels = np.array([0, 4, 5, 6])  # 1st and 5th in the top 5; 6th and 7th not
    m = evaluate(p, labels, names, prefix="val_").metrics
    assert m["val_top5_accuracy"] == pytest.approx(0.5)
    assert m["val_accuracy"] == pytest.approx(0.25)


# -------------------------------------------------------------------------- image datasets

def write_store(path: Path, n: int, size: int = 4, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    with ImageStoreWriter(path, size) as writer:
        for image in images:
            writer.append(image)
    return images


def make_split(indices: list[int], store: str = "train", name: str = "train") -> Split:
    labels = np.array([100 + i for i in indices], dtype=np.int64)  # label names the image
    return Split(name, (store,) * len(indices), np.array(indices, dtype=np.int64), labels,
                 tuple(f"img/{i}" for i in indices))


def collect(dataset) -> tuple[np.ndarray, np.ndarray, list[int]]:
    images, labels, sizes = [], [], []
    for x, y in dataset:
        assert x.dtype.name == "float32"
        images.append(x.numpy())
        labels.append(y.numpy())
        sizes.append(len(x))
    return np.concatenate(images), np.concatenate(labels), sizes


def test_image_dataset_reads_batches_in_manifest_order(tmp_path: Path) -> None:
    images = write_store(tmp_path / "train.npy", 12)
    order = [5, 0, 11, 3, 7, 2, 9]
    x, y, sizes = collect(image_dataset(tmp_path, make_split(order), 3))
    assert sizes == [3, 3, 1]
    np.testing.assert_array_equal(x, images[order].astype("float32"))
    np.testing.assert_array_equal(y, [100 + i for i in order])

    only_images = list(image_dataset(tmp_path, make_split(order), 4, with_labels=False))
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in only_images]),
                                  images[order].astype("float32"))


def test_image_dataset_shuffle_is_seeded(tmp_path: Path) -> None:
    images = write_store(tmp_path / "train.npy", 12)
    split = make_split(list(range(12)))
    x1, y1, _ = collect(image_dataset(tmp_path, split, 4, shuffle=True, seed=3))
    x2, y2, _ = collect(image_dataset(tmp_path, split, 4, shuffle=True, seed=3))
    _, y3, _ = collect(image_dataset(tmp_path, split, 4, shuffle=True, seed=4))
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1, x2)
    assert sorted(y1) == list(split.labels) and list(y1) != list(split.labels)
    assert list(y3) != list(y1)
    np.testing.assert_array_equal(x1, images[y1 - 100].astype("float32"))  # pairs kept


def test_image_dataset_rejects_a_split_over_two_stores(tmp_path: Path) -> None:
    write_store(tmp_path / "train.npy", 2)
    split = Split("val", ("train", "test"), np.array([0, 1]), np.array([0, 1]), ("a", "b"))
    with pytest.raises(DataError, match="mixes image stores"):
        image_dataset(tmp_path, split, 2)


# ------------------------------------------------------------------------------ features

def test_extract_features_writes_the_extractor_outputs(tmp_path: Path) -> None:
    trimmed = tmp_path / "trimmed"
    trimmed.mkdir()
    train_images = write_store(trimmed / "train.npy", 10, seed=1)
    test_images = write_store(trimmed / "test.npy", 4, seed=2)
    splits = {"train": make_split([9, 1, 4, 6, 0, 2, 8]),
              "val": make_split([3, 5, 7], name="val"),
              "test": make_split([2, 0, 3, 1], store="test", name="test")}
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))

    out = tmp_path / "features"
    forward = compile_forward(extractor, 3)
    result = extract_features(extractor, trimmed, feature_files(splits, 4, 4), out,
                              metadata={"backbone": "tiny"}, forward=forward,
                              show_progress=False)
    # 7, 3 and 4 images in batches of 3: the short last batches are padded, so one trace.
    assert forward.experimental_get_tracing_count() == 1
    assert result.images == 14 and result.dim == 5
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npy", "train.npy",
                                                     "val.npy"]
    stores = {"train": train_images, "test": test_images}
    for name, split in splits.items():
        features = np.load(out / f"{name}.npy")
        assert features.dtype == np.float32 and features.shape == (len(split), 5)
        expected = keras.ops.convert_to_numpy(
            extractor(stores[split.stores[0]][split.indices].astype("float32")))
        np.testing.assert_allclose(features, expected, atol=1e-5)
        assert not np.allclose(features, features[:1])  # rows differ: order is checkable
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"] == "tiny" and meta["dim"] == 5 and meta["images"] == 14
    assert "seconds" not in meta  # no timings: the same features hash the same
    assert result.images == 14 and result.seconds > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic


def test_image_store_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    images = write_store(tmp_path / "s.npy", 5, size=3)
    store = ImageStore(tmp_path / "s.npy")
    assert len(store) == 5 and store.shape == (5, 3, 3, 3)
    np.testing.assert_array_equal(store.read([4, 0]), images[[4, 0]])
    padded = store.read([2], rows=3)
    np.testing.assert_array_equal(padded[0], images[2])
    assert padded.shape == (3, 3, 3, 3) and not padded[1:].any()
    with pytest.raises(ValueError, match="do not fit"):
        store.read([0, 1], rows=1)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), images)


def test_npy_dataset_reads_feature_rows_with_the_same_reader(tmp_path: Path) -> None:
    rows = np.random.default_rng(5).normal(size=(7, 2, 3)).astype("float32")
    with NpyWriter(tmp_path / "f.npy", (2, 3), "float32") as writer:
        writer.extend(rows)
    labels = np.arange(7, dtype=np.int64)
    batches = list(npy_dataset(tmp_path / "f.npy", labels, 3))
    assert [len(x) for x, _ in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in batches]), rows)
    shuffled = list(npy_dataset(tmp_path / "f.npy", labels, 3, shuffle=True, seed=1))
    x = np.concatenate([b.numpy() for b, _ in shuffled])
    y = np.concatenate([b.numpy() for _, b in shuffled])
    np.testing.assert_array_equal(x, rows[y])  # rows stay with their labels
    with pytest.raises(DataError, match="rows for"):
        npy_dataset(tmp_path / "f.npy", labels[:3], 3)
