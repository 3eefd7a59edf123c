"""How fast the served champion answers: requests per second and p50/p95 latency for 1 and for
32 images per request, against `foodtransfer serve` on loopback (one client, one request at a
time, a bounded number of requests after a warm-up).

    python bench/serving.py                       # the champion of the project in this folder
    python bench/serving.py --model-uri runs:/<id>/model --requests 50
    python bench/serving.py --relog               # the champion's Keras model, re-logged with
                                                  # this checkout's serving code first

Run it from a project whose MLflow store holds the model (or with MLFLOW_TRACKING_URI set).
Figures go to bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))


def post(url: str, body: bytes) -> float:
    request = urllib.request.Request(url, data=body, headers={"Content-Type":
                                                              "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return time.perf_counter() - started


def relog(uri: str, side: int) -> str:
    """The Keras model and class names inside the pyfunc at ``uri``, logged as a new pyfunc by
    this checkout's ``log_model`` in an MLflow run 'serving-bench'; its URI."""
    import mlflow

    from foodtransfer.serving import logged_keras_model
    from foodtransfer.tracking.models import log_model

    keras_model, classes = logged_keras_model(uri)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run(run_name="serving-bench"):
        return log_model(keras_model, classes, np.zeros((1, side, side, 3), np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=None)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--relog", action="store_true",
                        help="serve the model's Keras model logged anew with this checkout's "
                             "code (a logged model serves with the code it was logged with)")
    parser.add_argument("--out", type=Path,
                        default=PROJECT / "bench" / "results" / "serving.json")
    args = parser.parse_args()

    from conftest import free_port, server_process
    from foodtransfer.cli import _default_model_uri
    from foodtransfer.predict import input_size

    uri = args.model_uri or _default_model_uri(Path("params.yaml"))
    side, _ = input_size(uri)
    if args.relog:
        uri = relog(uri, side)
        args.model_uri = uri
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "foodtransfer"), "serve", "--port", str(port)]
    if args.model_uri:
        command += ["--model-uri", args.model_uri]
    rows = []
    with server_process(command, f"{url}/ping"):
        for batch in (1, 32):
            images = np.random.default_rng(batch).integers(0, 256, (batch, side, side, 3))
            body = json.dumps({"inputs": images.tolist()}).encode()
            for _ in range(args.warmup):
                post(f"{url}/invocations", body)
            latencies = []
            started = time.perf_counter()
            for _ in range(args.requests):
                latencies.append(post(f"{url}/invocations", body))
            total = time.perf_counter() - started
            latencies.sort()
            rows.append({"images_per_request": batch, "requests": args.requests,
                         "requests_per_s": args.requests / total,
                         "images_per_s": args.requests * batch / total,
                         "p50_ms": 1000 * statistics.median(latencies),
                         "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
                         "request_bytes": len(body)})
    result = {"model_uri": uri, "image_size": side, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {uri} ({side} x {side} px), {args.requests} requests per size, one client")
    print("| images / request | requests / s | images / s | p50 latency | p95 latency |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['images_per_request']} | {row['requests_per_s']:.1f} | "
              f"{row['images_per_s']:.1f} | {row['p50_ms']:.0f} ms | {row['p95_ms']:.0f} ms |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
