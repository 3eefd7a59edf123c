"""Intervals and paired tests (foodtransfer.uncertainty) against known cases: a perfect model,
binomial proportions (scipy), a hand-computed McNemar table, and the plain index bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from foodtransfer.uncertainty import (classification_intervals, mcnemar_exact, mean_and_sd,
                                      paired_difference, pooled_interval, top_k_hits)


def noisy_predictions(n: int, classes: int, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    wrong = (labels + rng.integers(1, classes, n)) % classes
    predicted = np.where(rng.random(n) < accuracy, labels, wrong)
    return labels, predicted


def test_all_correct_predictions_give_the_interval_1_1() -> None:
    labels = np.arange(40) % 4
    bounds = classification_intervals(labels, labels, np.ones(40, bool), 4)
    assert bounds == {"accuracy": (1.0, 1.0), "top5_accuracy": (1.0, 1.0),
                      "macro_f1": (1.0, 1.0)}


@pytest.mark.parametrize(("n", "accuracy"), [(400, 0.85), (400, 0.5), (1000, 0.95)])
def test_accuracy_interval_matches_the_binomial_one(n: int, accuracy: float) -> None:
    labels, predicted = noisy_predictions(n, 8, accuracy, seed=n)
    low, high = classification_intervals(labels, predicted, labels == predicted, 8)["accuracy"]
    right = int(np.sum(labels == predicted))
    reference = binomtest(right, n).proportion_ci(0.95, method="wilson")
    assert low == pytest.approx(reference.low, abs=0.01)
    assert high == pytest.approx(reference.high, abs=0.01)
    assert low < right / n < high


def test_intervals_are_seeded_and_reproducible() -> None:
    labels, predicted = noisy_predictions(300, 5, 0.7)
    hits = top_k_hits(np.eye(5)[predicted] * 0.6 + 0.08, labels, 2)
    first = classification_intervals(labels, predicted, hits, 5)
    assert first == classification_intervals(labels, predicted, hits, 5)
    assert first != classification_intervals(labels, predicted, hits, 5, seed=1)


def test_macro_f1_interval_agrees_with_the_plain_index_bootstrap() -> None:
    """The cell resampling is the bootstrap: compare with resampling images one by one."""
    labels, predicted = noisy_predictions(200, 4, 0.7, seed=3)
    rng = np.random.default_rng(11)
    plain = []
    for _ in range(2000):
        rows = rng.integers(0, len(labels), len(labels))
        plain.append(f1_score(labels[rows], predicted[rows], labels=range(4), average="macro",
                              zero_division=0))
    low, high = classification_intervals(labels, predicted, labels == predicted, 4)["macro_f1"]
    assert low == pytest.approx(np.percentile(plain, 2.5), abs=0.012)
    assert high == pytest.approx(np.percentile(plain, 97.5), abs=0.012)
    point = f1_score(labels, predicted, labels=range(4), average="macro", zero_division=0)
    assert low < point < high


def test_top5_interval_and_hits() -> None:
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([2, 0, 1])
    np.testing.assert_array_equal(top_k_hits(probabilities, labels, 1), [False, False, False])
    np.testing.assert_array_equal(top_k_hits(probabilities, labels, 2), [False, False, True])
    np.testing.assert_array_equal(top_k_hits(probabilities, labels, 5), [True, True, True])


def test_mcnemar_matches_a_hand_computed_table() -> None:
    # Only A right on 10 images, only B right on 2: p = 2 * P(X <= 2), X ~ Bin(12, 1/2)
    #   = 2 * (1 + 12 + 66) / 4096 = 158 / 4096.
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    # 6 vs 0: p = 2 / 64.
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_paired_difference_on_a_known_table() -> None:
    # 400 images: both right 330, only A 10, only B 2, both wrong 58.
    a = np.array([True] * 330 + [True] * 10 + [False] * 2 + [False] * 58)
    b = np.array([True] * 330 + [False] * 10 + [True] * 2 + [False] * 58)
    result = paired_difference(a, b)
    assert (result.images, result.only_a_right, result.only_b_right) == (400, 10, 2)
    assert result.difference == pytest.approx(8 / 400)
    assert result.p_value == pytest.approx(158 / 4096) and result.significant
    assert result.ci_low < result.difference < result.ci_high
    assert result.ci_low > 0  # every resample keeps A ahead here: 10 vs 2 of 400
    swapped = paired_difference(b, a)
    assert swapped.difference == pytest.approx(-8 / 400) and swapped.p_value == result.p_value
    same = paired_difference(a, a)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant
    with pytest.raises(ValueError, match="equally long"):
        paired_difference(a, b[:10])


def test_pooled_interval_over_repeated_runs() -> None:
    labels, predicted = noisy_predictions(400, 8, 0.85)
    right = labels == predicted
    single = classification_intervals(labels, predicted, right, 8)["accuracy"]
    # Three identical runs carry no more information than one.
    pooled = pooled_interval(np.stack([right] * 3))
    assert pooled == pytest.approx(single, abs=0.01)
    # Three runs that disagree on some images: the interval centres on the mean accuracy.
    rng = np.random.default_rng(2)
    runs = np.stack([right ^ (rng.random(400) < 0.05) for _ in range(3)])
    low, high = pooled_interval(runs)
    assert low < runs.mean() < high and high - low < 0.09


def test_mean_and_sd() -> None:
    assert mean_and_sd([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    mean, sd = mean_and_sd([0.5])
    assert mean == 0.5 and np.isnan(sd)


def test_holm_adjustment_matches_the_step_down_by_hand() -> None:
    from foodtransfer.uncertainty import holm_adjusted

    # Sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1 with running maximum: 0.04, 0.06,
    # 0.08, 0.30; returned in the input order.
    assert holm_adjusted([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert holm_adjusted([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjusted([]) == []


# ------------------------------------------------------- seeds and test images: two levels
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _coverage(seeds: int, seed_spread: float, draws: int = 300, images: int = 300,
              base: float = 1.2) -> tuple[float, float]:
    """How often the two-level and the image-only 95 % intervals cover the true accuracy of
    a configuration (the mean over training seeds and over the image population) whose seed
    effect has sd ``seed_spread`` (logit scale), over ``draws`` simulated experiments."""
    from foodtransfer.uncertainty import pooled_interval, seed_image_interval

    rng = np.random.default_rng(123)
    truth = _sigmoid(base + rng.normal(0, 1, 2_000_000)
                     + rng.normal(0, seed_spread, 2_000_000)).mean()
    both = images_only = 0
    for draw in range(draws):
        easiness = rng.normal(0, 1, images)
        shifts = rng.normal(0, seed_spread, seeds)
        correct = rng.random((seeds, images)) < _sigmoid(base + easiness + shifts[:, None])
        low, high = seed_image_interval(correct, resamples=500, seed=draw)
        both += low <= truth <= high
        low, high = pooled_interval(correct, resamples=500, seed=draw)
        images_only += low <= truth <= high
    return both / draws, images_only / draws


@pytest.mark.parametrize("seeds", [3, 10])
def test_the_two_level_interval_covers_the_truth_when_seeds_vary(seeds: int) -> None:
    """300 simulated configurations of 3 or 10 seeds, 300 test images, a large seed spread:
    the two-level interval covers the true accuracy in 92–99 % of them (a 95 % interval,
    tolerance stated; measured 0.97 and 0.95); the image-only interval, blind to the seeds,
    in far fewer (measured 0.46 and 0.64)."""
    both, images_only = _coverage(seeds=seeds, seed_spread=0.5)
    assert 0.92 <= both <= 0.99, both
    assert images_only < 0.80, images_only


def test_without_seed_variance_both_intervals_cover() -> None:
    both, images_only = _coverage(seeds=5, seed_spread=0.0, draws=150)
    assert both >= 0.90 and images_only >= 0.90, (both, images_only)


def test_the_seed_level_needs_three_seeds_and_widens_the_interval() -> None:
    from foodtransfer.uncertainty import pooled_interval, seed_image_interval

    rng = np.random.default_rng(5)
    two = rng.random((2, 200)) < np.array([[0.3], [0.95]])  # two seeds 65 points apart
    assert seed_image_interval(two) is None
    three = rng.random((3, 200)) < np.array([[0.3], [0.95], [0.6]])
    both, images = seed_image_interval(three), pooled_interval(three)
    assert both[1] - both[0] >= images[1] - images[0]
    assert both[1] - both[0] > 0.2  # the seeds' spread, not the images', dominates


def test_a_configuration_difference_pairs_the_images_and_resamples_the_seeds() -> None:
    from foodtransfer.uncertainty import configuration_difference

    rng = np.random.default_rng(9)
    easy = rng.random(400)
    better = easy[None, :] < np.array([[0.82], [0.85], [0.84]])  # ~ +10 points on the same
    worse = easy[None, :] < np.array([[0.72], [0.75], [0.74]])   # images: a paired gain
    result = configuration_difference(better, worse)
    assert result.difference == pytest.approx(better.mean() - worse.mean())
    assert 0.05 < result.ci_low < result.difference < result.ci_high < 0.2
    assert result.p_value < 0.01 and (result.seeds_a, result.seeds_b) == (3, 3)
    same = configuration_difference(better, better[::-1])
    assert same.difference == 0 and same.ci_low <= 0 <= same.ci_high and same.p_value > 0.5
    with pytest.raises(ValueError, match="same images"):
        configuration_difference(better, worse[:, :10])
