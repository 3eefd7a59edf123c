"""How fast the served model answers photos, side by side with the same model in-process, in
one run: one photo per request (p50, p95), 32 photos per request (photos / s), and 4
concurrent clients x 25 one-photo requests (requests / s, p50, p95), against
`foodtransfer serve` on loopback; the in-process figures are `foodtransfer predict`'s path
(decode the file, resize, the pyfunc) on the same photos.

    python bench/serving.py --weights ../shared/weights/mobilenet_v2_1.0_224_no_top.weights.h5 \
        --photos ../shared/data/food-101-mini8.tar.gz
    python bench/serving.py --model-uri models:/food101-classifier@champion --photos DIR

With --weights, the model is the default recipe's (256 px photos cropped to MobileNetV2 at
224 px with those weights, mirror TTA) with an untrained head (the speed does not depend on
the head's weights), logged with this checkout's code into a
temporary store; with --model-uri, the model of the project in the current folder. --photos is
a folder of photos or a .tar.gz holding some (the first 64 .jpg files are used). Figures go to
bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))
PHOTOS = 64
CONCURRENT_CLIENTS, REQUESTS_PER_CLIENT = 4, 25


def post(url: str, body: bytes) -> float:
    request = urllib.request.Request(url, data=body, headers={"Content-Type":
                                                              "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return time.perf_counter() - started


def photo_files(source: Path, folder: Path) -> list[Path]:
    if source.is_dir():
        return sorted(source.rglob("*.jpg"))[:PHOTOS]
    with tarfile.open(source) as archive:
        members = [m for m in archive if m.name.endswith(".jpg")][:PHOTOS]
        archive.extractall(folder, members=members, filter="data")
    return sorted(folder.rglob("*.jpg"))


def standin_model(weights: Path, root: Path) -> str:
    """The default recipe's deployed model: 256 px photos, centre crop to MobileNetV2 at
    224 px with ``weights``, mirror-averaged (TTA), an untrained 8-class head; logged as the
    pipeline logs a variant into the store under ``root``. Its URI."""
    import keras

    from foodtransfer.models.classifiers import (build_feature_extractor, build_head,
                                                 build_image_classifier)
    from foodtransfer.tracking.runs import tracked_run

    extractor = build_feature_extractor("MobileNetV2", str(weights), 224)
    head = build_head(extractor.output_shape[-1], 8, dropout=0.6)
    model = build_image_classifier(extractor, head, image_size=256, tta=True)
    keras.utils.set_random_seed(0)
    saved = root / "saved"
    saved.mkdir()
    model.save(saved / "model.keras")
    (saved / "classes.json").write_text(json.dumps([f"class{i}" for i in range(8)]))
    with tracked_run("bench-serving", "transfer", "variant", {"seed": 0},
                     {"data_version": "bench"}) as run:
        return run.log_model(saved / "model.keras", saved / "classes.json",
                             np.zeros((1, 256, 256, 3), np.float32))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process(uri: str, photos: list[Path], requests: int, side: int) -> dict:
    """`foodtransfer predict`'s path, one photo at a time and 32 at a time."""
    from foodtransfer.predict import load_model, probabilities, read_images

    model = load_model(uri)
    for path in photos[:3]:  # warm-up
        probabilities(model, read_images([path], side, side))
    one = []
    for index in range(requests):
        started = time.perf_counter()
        probabilities(model, read_images([photos[index % len(photos)]], side, side))
        one.append(time.perf_counter() - started)
    batch = []
    for index in range(max(requests // 4, 5)):
        chosen = [photos[(index + k) % len(photos)] for k in range(32)]
        started = time.perf_counter()
        probabilities(model, read_images(chosen, side, side))
        batch.append(time.perf_counter() - started)
    return {"one_p50_ms": 1000 * statistics.median(one),
            "one_p95_ms": 1000 * percentile(one, 0.95),
            "one_per_s": len(one) / sum(one),
            "batch32_photos_per_s": 32 / statistics.median(batch)}


def onnx_in_process(uri: str, photos: list[Path], requests: int, side: int,
                    scratch: Path) -> dict | None:
    """The same photos through the model exported to ONNX, in onnxruntime (decode included);
    None where the onnx extra is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from foodtransfer.predict import read_images
    from foodtransfer.serving import export_model, onnx_session

    started = time.perf_counter()
    folder = export_model(uri, scratch / "onnx", "onnx")
    export_s = time.perf_counter() - started
    session, name = onnx_session(folder / "model.onnx")

    def classify(paths: list[Path]) -> None:
        session.run(None, {name: read_images(paths, side, side).astype("float32")})

    for path in photos[:3]:
        classify([path])
    one = []
    for index in range(requests):
        started = time.perf_counter()
        classify([photos[index % len(photos)]])
        one.append(time.perf_counter() - started)
    batch = []
    for index in range(max(requests // 4, 5)):
        started = time.perf_counter()
        classify([photos[(index + k) % len(photos)] for k in range(32)])
        batch.append(time.perf_counter() - started)
    return {"one_p50_ms": 1000 * statistics.median(one),
            "one_p95_ms": 1000 * percentile(one, 0.95),
            "batch32_photos_per_s": 32 / statistics.median(batch), "export_s": export_s}


def served(url: str, photos: list[Path], requests: int, side: int) -> dict:
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in photos]

    def body(rows: list[str]) -> bytes:
        return json.dumps({"inputs": {"image": rows}}).encode()

    for index in range(3):
        post(url, body([encoded[index]]))
    one = [post(url, body([encoded[index % len(encoded)]])) for index in range(requests)]
    batch = [post(url, body([encoded[(index + k) % len(encoded)] for k in range(32)]))
             for index in range(max(requests // 4, 5))]
    # The old protocol: the decoded pixels as JSON digits.
    from foodtransfer.predict import read_images

    pixels = json.dumps({"inputs": read_images(photos[:1], side, side).tolist()}).encode()
    digits = [post(url, pixels) for _ in range(max(requests // 4, 5))]

    def client(number: int) -> list[float]:
        return [post(url, body([encoded[(number * 7 + k) % len(encoded)]]))
                for k in range(REQUESTS_PER_CLIENT)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        latencies = [t for result in pool.map(client, range(CONCURRENT_CLIENTS))
                     for t in result]
    wall = time.perf_counter() - started
    return {"one_p50_ms": 1000 * statistics.median(one),
            "one_p95_ms": 1000 * percentile(one, 0.95),
            "one_per_s": len(one) / sum(one),
            "batch32_photos_per_s": 32 / statistics.median(batch),
            "pixels_json_p50_ms": 1000 * statistics.median(digits),
            "pixels_json_bytes": len(pixels),
            "photo_json_bytes": len(body(encoded[:1])),
            "concurrent_requests": len(latencies),
            "concurrent_per_s": len(latencies) / wall,
            "concurrent_p50_ms": 1000 * statistics.median(latencies),
            "concurrent_p95_ms": 1000 * percentile(latencies, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=None)
    parser.add_argument("--weights", type=Path, default=None,
                        help="MobileNetV2 no-top weights: bench a model built with them")
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=40, help="timed one-photo requests")
    parser.add_argument("--out", type=Path,
                        default=PROJECT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    if (args.model_uri is None) == (args.weights is None):
        parser.error("give --model-uri or --weights")

    from conftest import free_port, server_process

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photos = photo_files(args.photos.resolve(), scratch / "photos")
        if not photos:
            parser.error(f"no .jpg photos in {args.photos}")
        out = args.out.resolve()
        if args.weights is not None:
            weights = args.weights.resolve()
            project = scratch / "project"
            project.mkdir()
            os.chdir(project)  # the store of this temporary project: ./mlruns
            uri = standin_model(weights, project)
        else:
            uri = args.model_uri
        from foodtransfer.predict import input_size

        side, _ = input_size(uri)
        local = in_process(uri, photos, args.requests, side)
        onnx = onnx_in_process(uri, photos, args.requests, side, scratch)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [str(Path(sys.executable).parent / "foodtransfer"), "serve", "--port",
                   str(port), "--model-uri", uri]
        with server_process(command, f"{url}/ping"):
            remote = served(f"{url}/invocations", photos, args.requests, side)
    result = {"model_uri": uri, "image_size": side, "photos": len(photos),
              "requests": args.requests, "in_process": local, "served": remote,
              "onnxruntime": onnx,
              "ratios": {"one_p50_served_over_in_process":
                         remote["one_p50_ms"] / local["one_p50_ms"],
                         "batch32_served_over_in_process":
                         remote["batch32_photos_per_s"] / local["batch32_photos_per_s"],
                         "concurrent_over_in_process_one_at_a_time":
                         remote["concurrent_per_s"] / local["one_per_s"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ratios = result["ratios"]
    print(f"model {uri} ({side} x {side} px), {len(photos)} photos, medians")
    print("| | in-process (predict) | served (photo JSON) | served / in-process |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one photo: p50 latency | {local['one_p50_ms']:.0f} ms | "
          f"{remote['one_p50_ms']:.0f} ms | {ratios['one_p50_served_over_in_process']:.2f}× |")
    print(f"| one photo: p95 latency | {local['one_p95_ms']:.0f} ms | "
          f"{remote['one_p95_ms']:.0f} ms | |")
    print(f"| 32 photos per call: photos / s | {local['batch32_photos_per_s']:.1f} | "
          f"{remote['batch32_photos_per_s']:.1f} | "
          f"{ratios['batch32_served_over_in_process']:.2f}× |")
    print(f"| {CONCURRENT_CLIENTS} clients × {REQUESTS_PER_CLIENT} one-photo requests: "
          f"requests / s (vs in-process one at a time) | {local['one_per_s']:.1f} | "
          f"{remote['concurrent_per_s']:.1f} (p50 {remote['concurrent_p50_ms']:.0f} ms, p95 "
          f"{remote['concurrent_p95_ms']:.0f} ms) | "
          f"{ratios['concurrent_over_in_process_one_at_a_time']:.2f}× |")
    print(f"| one image as JSON pixel digits ({remote['pixels_json_bytes'] / 1e6:.1f} MB; a "
          f"photo: {remote['photo_json_bytes'] / 1e3:.0f} kB) | | "
          f"{remote['pixels_json_p50_ms']:.0f} ms | |")
    if onnx:
        print(f"ONNX Runtime in-process (exported in {onnx['export_s']:.0f} s): one photo p50 "
              f"{onnx['one_p50_ms']:.0f} ms (p95 {onnx['one_p95_ms']:.0f} ms), 32 photos per "
              f"call {onnx['batch32_photos_per_s']:.1f} photos / s; TensorFlow in-process: "
              f"{local['one_p50_ms']:.0f} ms, {local['batch32_photos_per_s']:.1f} photos / s")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
