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
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import free_port, server_process
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
                        env=project_env(project["root"])):
        yield {**project, "url": url}


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
