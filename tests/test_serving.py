"""The champion served and exported: `foodtransfer serve` (MLflow's scoring server on a
loopback port) answers /ping, classifies real image tensors POSTed to /invocations as
`foodtransfer predict` does, and refuses bad requests with a 4xx and a message; the pyfunc
takes uint8 and float batches in Python; `foodtransfer export` writes a SavedModel that
TensorFlow reloads and that predicts what the pyfunc predicts."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import EPS, free_port, grey_png, server_process
from foodtransfer.cli import app
from foodtransfer.data.images import decode_image
from test_predict import CLASSES, ENV_KEYS, MODEL_NAME, SIZE, project  # noqa: F401

BIN = Path(sys.executable).parent


def project_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ENV_KEYS}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def load_pyfunc(project: dict):
    mlflow.set_tracking_uri(f"sqlite:///{project['root'] / 'mlruns' / 'mlflow.db'}")
    try:
        return mlflow.pyfunc.load_model(project["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)


def decoded(project: dict) -> tuple[list[Path], np.ndarray]:
    images = project["images"]
    paths = [images / "a.jpg", images / "b.png", images / "more" / "c.jpeg"]
    return paths, np.stack([decode_image(path, SIZE).pixels for path in paths])


@pytest.fixture(scope="module")
def served(project: dict):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "foodtransfer"), "serve", "--port", str(port)]
    with server_process(command, f"{url}/ping", cwd=project["root"],
                        env=project_env(project["root"])) as process:
        yield {**project, "url": url, "process": process}


def test_served_champion_matches_predict(served: dict) -> None:
    paths, pixels = decoded(served)
    status, body = post(f"{served['url']}/invocations",
                        json.dumps({"inputs": pixels.tolist()}).encode())
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == 3 and set(predictions[0]) == set(CLASSES)
    result = subprocess.run([str(BIN / "foodtransfer"), "predict", *map(str, paths), "--json",
                             "--top-k", "1"], cwd=served["root"],
                            env=project_env(served["root"]), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    top1 = [entry["predictions"][0]["class_name"] for entry in
            json.loads(result.stdout)["images"]]
    assert [max(row, key=row.get) for row in predictions] == top1
    # The same numbers as the pyfunc in Python, on uint8 and float input alike.
    model = load_pyfunc(served)
    expected = [[row[name] for name in CLASSES] for row in predictions]
    for batch in (pixels, pixels.astype("float32")):
        frame = model.predict(batch)
        np.testing.assert_allclose(frame[CLASSES].to_numpy(), expected, atol=1e-5)
    # The photos' file bytes, in each of MLflow's JSON forms and as bytes in Python: decoded
    # inside the model as predict decodes them, the same probabilities.
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in paths]
    for form in ({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
                 {"dataframe_records": [{"image": e} for e in encoded]},
                 {"inputs": {"image": encoded}}, {"inputs": encoded},
                 {"instances": [{"image": {"b64": e}} for e in encoded]},
                 {"instances": [{"b64": e} for e in encoded]}):
        status, body = post(f"{served['url']}/invocations", json.dumps(form).encode())
        assert status == 200, (next(iter(form)), body[:500])
        got = [[row[name] for name in CLASSES] for row in json.loads(body)["predictions"]]
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(next(iter(form))))
    frame = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in paths]}))
    np.testing.assert_allclose(frame[CLASSES].to_numpy(), expected, atol=1e-5)


def test_ping_and_bad_requests_are_4xx_with_a_message(served: dict) -> None:
    with urllib.request.urlopen(f"{served['url']}/ping", timeout=30) as response:
        assert response.status == 200
    cases = {
        "wrong shape": json.dumps({"inputs": np.zeros((2, SIZE + 1, SIZE, 3)).tolist()}),
        "not images": json.dumps({"inputs": [["pizza", "sushi"]]}),
        "not numbers": json.dumps({"inputs": "hello"}),
        "not JSON": "this is not json",
    }
    for case, body in cases.items():
        status, text = post(f"{served['url']}/invocations", body.encode())
        assert 400 <= status < 500, (case, status, text[:500])
        message = json.loads(text).get("message", "")
        assert message, (case, text[:500])
        if case == "wrong shape":
            assert f"or pixels (n, {SIZE}, {SIZE}, 3)" in message, message
            assert f"got an array of shape (2, {SIZE + 1}, {SIZE}, 3)" in message
    # Bad photos: a 400 that names the row, never a 500.
    photo = base64.b64encode((served["images"] / "a.jpg").read_bytes()).decode()
    bad = {"not base64": (["%%%not base64%%%"], "row 0: the image is neither bytes nor base64"),
           "not an image": ([photo, base64.b64encode(b"hello").decode()],
                            "row 1: cannot decode the image: not an image"),
           "truncated": ([photo, photo, photo[:200]], "row 2: cannot decode the image: corrupt")}
    for case, (rows, expected) in bad.items():
        status, text = post(f"{served['url']}/invocations",
                            json.dumps({"inputs": {"image": rows}}).encode())
        assert status == 400, (case, status, text[:500])
        assert expected in json.loads(text)["message"], (case, text[:500])


def _reset_peak_rss(pid: int) -> None:
    """Reset Linux's peak resident memory (VmHWM) of a process and its children to now."""
    import psutil

    process = psutil.Process(pid)
    for member in [process, *process.children(recursive=True)]:
        Path(f"/proc/{member.pid}/clear_refs").write_text("5")


def _tree_peak_rss(pid: int) -> int:
    """The peak resident memory (Linux's VmHWM) of a process and its children, summed, in
    bytes: what a request that decoded a bomb would raise, even after it freed it."""
    import psutil

    process = psutil.Process(pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        for line in Path(f"/proc/{member.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def _post_raw(url: str, body: bytes, chunk: int = 1 << 20) -> tuple[int, str]:
    """POST ``body`` as a plain client does (Content-Length, no Expect: 100-continue)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", parts.path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            connection.send(view[start:start + chunk])
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# The most the scoring server's memory may grow over a batch of hostile requests: decoding
# any of them would take 300 MB to 1 GB.
HOSTILE_RSS_BOUND = 100 * 1024 * 1024


def test_photos_are_bounded_before_they_are_decoded(served: dict, tmp_path: Path) -> None:
    from foodtransfer.data.images import MAX_PIXELS

    photo = base64.b64encode((served["images"] / "a.jpg").read_bytes()).decode()
    good = json.dumps({"inputs": {"image": [photo]}}).encode()
    assert post(f"{served['url']}/invocations", good)[0] == 200  # warm: the model is loaded
    server = served["process"].pid
    _reset_peak_rss(server)  # the high-water mark of loading the model is not ours to count
    before = _tree_peak_rss(server)
    bomb = grey_png(18_000, 18_000)  # 324 MP
    over = grey_png(10_000, 10_000)  # 100 MP: over the limit, under PIL's own backstop
    assert len(bomb) < 1_000_000 and 18_000 ** 2 > 300_000_000 and 10_000 ** 2 > MAX_PIXELS
    # A progressive JPEG is not bounded by JPEG's reduced-scale decoding; an animated WebP's
    # decoder holds whole canvases.
    progressive = _encoded(Image.new("L", (6_000, 6_000), 128), "JPEG", progressive=True)
    frames = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(3)]
    animated = _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    cases = {
        "bomb": (json.dumps({"inputs": {"image": [base64.b64encode(bomb).decode()]}}),
                 400, "row 0: cannot decode the image: the image declares 324000000 pixels "
                      "(324 MP), over the limit of 60 MP"),
        "over the limit": (json.dumps({"inputs": {"image": [photo,
                                                            base64.b64encode(over).decode()]}}),
                           400, "row 1: cannot decode the image: the image declares 10000 x "
                                "10000 pixels (100 MP)"),
        "progressive JPEG": (json.dumps({"inputs": {"image": [base64.b64encode(
            progressive).decode()]}}), 400, "row 0: cannot decode the image: the image "
                                            "declares 6000 x 6000 pixels (36 MP), over the "
                                            "limit of 30 MP for a progressive JPEG"),
        "animated WebP": (json.dumps({"inputs": {"image": [base64.b64encode(
            animated).decode()]}}), 400, "row 0: cannot decode the image: an animated WEBP "
                                         "(3 frames) is not a photo"),
        "EPS": (json.dumps({"inputs": {"image": [base64.b64encode(EPS).decode()]}}),
                400, "row 0: cannot decode the image: not an image in a photo format (JPEG, "
                     "PNG, WEBP"),
    }
    for case, (body, status, expected) in cases.items():
        started = time.monotonic()
        got, text = post(f"{served['url']}/invocations", body.encode())
        assert time.monotonic() - started < 10, case
        assert got == status, (case, got, text[:500])
        assert expected in json.loads(text)["message"], (case, text[:500])
    # A 64 MB body: 413 before it is parsed, from a plain client and from one that asks
    # Expect: 100-continue (then the body is never sent).
    huge = b"[" + b"0," * (32 * 1024 * 1024) + b"0]"
    started = time.monotonic()
    got, text = _post_raw(f"{served['url']}/invocations", huge)
    assert time.monotonic() - started < 20
    assert got == 413, (got, text[:500])
    assert "over the server's limit of 41943040 bytes" in json.loads(text)["message"]
    del huge
    # A chunked body (no length declared): 413 once it passes the limit.
    got, text = _post_chunked(f"{served['url']}/invocations", 48 * 1024 * 1024)
    assert got == 413, (got, text[:500])
    assert "the request body is over" in json.loads(text)["message"]
    # A chunked body within the limit is handed on whole.
    got, text = _post_chunked(f"{served['url']}/invocations", 0, good)
    assert got == 200, (got, text[:500])
    curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                           "Content-Type: application/json", "-H", "Expect: 100-continue",
                           "--data-binary", f"@{_big_file(tmp_path)}",
                           f"{served['url']}/invocations"],
                          capture_output=True, text=True, timeout=60)
    assert curl.stdout == "413", (curl.stdout, curl.stderr)
    grown = _tree_peak_rss(server) - before
    print(f"scoring server peak RSS: {before / 2**20:.0f} MB before, "
          f"{(before + grown) / 2**20:.0f} MB after")
    assert grown < HOSTILE_RSS_BOUND, f"the server grew by {grown / 2**20:.0f} MB"
    assert post(f"{served['url']}/invocations", good)[0] == 200  # and it still answers
    # predict: the same limit (our header check refuses the 100 MP PNG, PIL's backstop the
    # 324 MP one), exit 2 in one line.
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "over.png").write_bytes(over)
    result = subprocess.run([str(BIN / "foodtransfer"), "predict", str(tmp_path / "bomb.png"),
                             str(tmp_path / "over.png")],
                            cwd=served["root"], env=project_env(served["root"]),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "declares 324000000 pixels (324 MP)" in result.stderr
    assert "declares 10000 x 10000 pixels (100 MP)" in result.stderr


def _encoded(image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _post_chunked(url: str, size: int, body: bytes | None = None) -> tuple[int, str]:
    """POST ``body`` (or ``size`` bytes of JSON-ish filler) with Transfer-Encoding: chunked."""
    import http.client
    from urllib.parse import urlsplit

    def chunks():
        if body is not None:
            yield body
            return
        piece = b"0," * (512 * 1024)
        sent = 0
        while sent < size:
            yield piece
            sent += len(piece)

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", parts.path, body=chunks(),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _big_file(folder: Path) -> Path:
    path = folder / "big.json"
    with open(path, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    return path


def test_requests_beyond_the_in_flight_limit_get_503_before_their_body(served: dict) -> None:
    """MAX_IN_FLIGHT requests still sending their bodies hold every slot: the next is
    answered 503 at once; once they are gone a photo is answered again."""
    import socket
    from urllib.parse import urlparse

    from foodtransfer.serving import MAX_IN_FLIGHT

    address = urlparse(served["url"])
    holders = []
    try:
        for _ in range(MAX_IN_FLIGHT):
            holder = socket.create_connection((address.hostname, address.port), timeout=10)
            holder.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
            holders.append(holder)
        time.sleep(1)  # the server has read their headers and waits for the rest
        started = time.monotonic()
        status, text = post(f"{served['url']}/invocations", b'{"inputs": {"image": []}}')
        assert status == 503, (status, text)
        assert "TEMPORARILY_UNAVAILABLE" in text and f"scoring {MAX_IN_FLIGHT} requests" in text
        assert time.monotonic() - started < 5
    finally:
        for holder in holders:
            holder.close()
    photo = base64.b64encode((served["images"] / "a.jpg").read_bytes()).decode()
    good = json.dumps({"inputs": {"image": [photo]}}).encode()
    deadline = time.monotonic() + 30
    while (status := post(f"{served['url']}/invocations", good)[0]) == 503:
        assert time.monotonic() < deadline, "the slots were never released"
        time.sleep(0.2)
    assert status == 200


def test_the_pyfunc_refuses_bad_input_with_a_clear_error(project: dict) -> None:  # noqa: F811
    from mlflow.exceptions import MlflowException

    model = load_pyfunc(project)
    one = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert model.predict(one).shape == (1, len(CLASSES))  # one image, no batch axis
    with pytest.raises(MlflowException, match=r"got an array of shape \(1, 4, 4, 3\)"):
        model.predict(np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(MlflowException, match="got values of type <U1"):
        model.predict(np.array([["a"]]))
    with pytest.raises(MlflowException, match="row 1: cannot decode the image: no bytes"):
        model.predict(pd.DataFrame({"image": [(project["images"] / "a.jpg").read_bytes(),
                                              b""]}))
    with pytest.raises(MlflowException, match="NaN"):
        model.predict(np.full((1, SIZE, SIZE, 3), np.nan, np.float32))


def test_export_writes_a_saved_model_that_predicts_like_the_pyfunc(project: dict,  # noqa: F811
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    import tensorflow as tf

    monkeypatch.chdir(project["root"])
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "export" / "food101"
    result = CliRunner().invoke(app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    version_dir = out / "1"  # the champion is version 1 of food-test
    assert (version_dir / "saved_model.pb").is_file()
    assert json.loads((version_dir / "assets.extra" / "classes.json").read_text()) == CLASSES
    assert "TF Serving: docker run" in result.stdout
    _, pixels = decoded(project)
    loaded = tf.saved_model.load(str(version_dir))
    exported = loaded.serve(tf.constant(pixels.astype("float32"))).numpy()
    expected = load_pyfunc(project).predict(pixels)
    np.testing.assert_allclose(exported, expected[CLASSES].to_numpy(), atol=1e-5)
    # Exporting again replaces the version folder atomically.
    assert CliRunner().invoke(app, ["export", "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["1"]


def test_onnx_export_runs_in_onnxruntime_like_the_pyfunc(project: dict,  # noqa: F811
                                                        tmp_path: Path, monkeypatch) -> None:
    from foodtransfer.serving import onnx_session

    monkeypatch.chdir(project["root"])
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "1").iterdir()) == ["classes.json", "model.onnx"]
    assert json.loads((out / "1" / "classes.json").read_text()) == CLASSES
    _, pixels = decoded(project)
    session, input_name = onnx_session(out / "1" / "model.onnx")
    (exported,) = session.run(None, {input_name: pixels.astype("float32")})
    expected = load_pyfunc(project).predict(pixels)[CLASSES].to_numpy()
    assert exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    assert not np.allclose(expected, expected[0])  # the images get different answers
    bad = CliRunner().invoke(app, ["export", "--format", "tflite", "--out", str(out)])
    assert bad.exit_code == 2
    assert "--format 'tflite' is not one of saved_model, onnx" in bad.output


def test_serve_and_export_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    for command in (["serve", "--port", str(free_port())], ["export"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"foodtransfer {command[0]}: error:" in result.output
        assert "no MLflow store" in result.output
