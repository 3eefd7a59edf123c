"""What op determinism costs the features stage: the same compiled backbone pass over the same
images with and without ``tf.config.experimental.enable_op_determinism()``, each in a fresh
process (it cannot be turned off once on), alternating, medians of repeats; and whether two
runs give the same bytes.

Usage: python bench/determinism.py [--repeats 3] [--images 256] [--size 224]
[--backbone MobileNetV2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, hashlib
import numpy as np
deterministic, images, size, backbone = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from foodtransfer.stages.runner import prepare_tensorflow
prepare_tensorflow()
import keras, tensorflow as tf
keras.utils.set_random_seed(0)
if deterministic:
    tf.config.experimental.enable_op_determinism()
from foodtransfer.models.classifiers import build_feature_extractor
from foodtransfer.models.inference import compile_forward
forward = compile_forward(build_feature_extractor(backbone, "none", size))
batch = np.random.default_rng(1).integers(0, 256, (forward.batch_size, size, size, 3), np.uint8)
forward(batch)  # traced
started = time.perf_counter()
outputs = [forward(batch).numpy() for _ in range(images // forward.batch_size)]
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "sha": hashlib.sha256(np.concatenate(outputs).tobytes()).hexdigest()}))
"""


def measure(deterministic: bool, args: argparse.Namespace) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, "1" if deterministic else "0",
                             str(args.images), str(args.size), args.backbone],
                            capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbone", default="MobileNetV2")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    hashes: dict[bool, set[str]] = {False: set(), True: set()}
    for _ in range(args.repeats):
        for deterministic in (False, True):
            result = measure(deterministic, args)
            times[deterministic].append(result["seconds"])
            hashes[deterministic].add(result["sha"])
    plain, fixed = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.backbone} at {args.size} px, {args.images} images, medians of "
          f"{args.repeats} (alternating, fresh processes):")
    print("| op determinism | seconds | images/s | distinct outputs over the runs |")
    print("| --- | ---: | ---: | ---: |")
    for label, value, key in (("off", plain, False), ("on", fixed, True)):
        print(f"| {label} | {value:.2f} | {args.images / value:.1f} | {len(hashes[key])} |")
    print(f"ratio on/off: {fixed / plain:.2f}x")
    digest = hashlib.sha256("".join(sorted(hashes[True] | hashes[False])).encode())
    print(f"(outputs digest {digest.hexdigest()[:12]})")


if __name__ == "__main__":
    main()
