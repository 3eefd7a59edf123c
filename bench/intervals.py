"""What the 95 % intervals cost: `evaluate` with and without them, side by side in one run,
on the mini8 test size (400 images, 8 classes) and the full Food-101 test size (25 250
images, 101 classes), medians of repeats. Usage: python bench/intervals.py [--repeats 7]"""

from __future__ import annotations

import argparse

import numpy as np

from benchmark import median_time  # bench/benchmark.py, beside this script
from foodtransfer.evaluation import evaluate


def predictions(images: int, classes: int, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    logits = rng.normal(0, 1, (images, classes))
    right = rng.random(images) < accuracy
    logits[np.arange(images), labels] += np.where(right, 4.0, -1.0)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities.astype("float32"), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| test images | classes | evaluate | + intervals | intervals alone |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for images, classes in ((400, 8), (2000, 20), (25250, 101)):
        probabilities, labels = predictions(images, classes, 0.8)
        names = [f"c{i}" for i in range(classes)]
        plain = median_time(lambda: evaluate(probabilities, labels, names), args.repeats)
        full = median_time(lambda: evaluate(probabilities, labels, names, intervals=True),
                              args.repeats)
        print(f"| {images} | {classes} | {plain:.3f} s | {full:.3f} s | {full - plain:.3f} s |")


if __name__ == "__main__":
    main()
