"""The ``foodtransfer`` CLI (foodtransfer.cli, foodtransfer.predict) through Typer's CliRunner:
``predict`` with a tiny Keras classifier logged and registered exactly as the pipeline does it
(top-k, probabilities that match the pyfunc model, JSON and text output, folders) and its error
paths (one line, exit code 2), and ``ui`` (the command it would run, busy port, no store)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import free_port
from foodtransfer.cli import app
from foodtransfer.data.images import decode_image

CLASSES = ["pizza", "sushi", "tacos"]
SIZE = 16
MODEL_NAME = "food-test"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")


def _isolate(monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    monkeypatch.chdir(cwd)
    for name in ENV_KEYS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A project folder whose store holds a logged image classifier registered as
    ``food-test@champion`` (params.yaml names it), plus a folder of test images."""
    import keras

    from foodtransfer.tracking.registry import register_version, set_alias
    from foodtransfer.tracking.runs import tracked_run

    root = tmp_path_factory.mktemp("predict") / "project"
    root.mkdir()
    (root / "params.yaml").write_text(f"mlflow:\n  registered_model: {MODEL_NAME}\n")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, root)
        keras.utils.set_random_seed(3)
        inputs = keras.Input((SIZE, SIZE, 3), name="image")
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        # A nested head with dropout called twice, as the pipeline's with TTA (the mirrored
        # image): dropout is inactive when predicting.
        features = keras.Input((4,))
        head = keras.Model(features, keras.layers.Dense(len(CLASSES), activation="softmax")(
            keras.layers.Dropout(0.5)(features)), name="head")
        model = keras.Model(inputs, keras.layers.Average()(
            [head(x), head(keras.layers.Rescaling(0.5)(x))]))
        saved = root / "saved"
        saved.mkdir()
        model.save(saved / "model.keras")
        (saved / "classes.json").write_text(json.dumps(CLASSES))
        example = np.random.default_rng(0).uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")
        with tracked_run("unit", "transfer", "variant", {"seed": 1},
                         {"data_version": "v"}) as run:
            model_uri = run.log_model(saved / "model.keras", saved / "classes.json", example)
            run_id = run.run_id
        set_alias(MODEL_NAME, "champion", register_version(model_uri, MODEL_NAME, tags={}))
        images = root / "images"
        (images / "more").mkdir(parents=True)
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(images / "a.jpg")
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(images / "b.png")
        Image.fromarray(rng.integers(0, 255, (24, 36, 4), dtype=np.uint8), "CMYK").save(
            images / "more" / "c.jpeg")
        (images / "notes.txt").write_text("not an image, and not picked from a folder")
        mlflow.set_tracking_uri(None)
    yield {"root": root, "model_uri": model_uri, "run_id": run_id, "images": images}


@pytest.fixture
def in_project(project: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    _isolate(monkeypatch, project["root"])
    yield project
    mlflow.set_tracking_uri(None)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def expected_probabilities(model_uri: str, paths: list[Path]) -> np.ndarray:
    """What the pyfunc model itself says about the images, decoded as the trim stage does."""
    model = mlflow.pyfunc.load_model(model_uri)
    images = np.stack([decode_image(path, SIZE).pixels for path in paths]).astype("float32")
    frame = model.predict(images)
    assert list(frame.columns) == CLASSES
    return frame.to_numpy()


# ------------------------------------------------------------------------------ predict
def test_predict_champion_json_matches_the_pyfunc_model(in_project: dict) -> None:
    images = in_project["images"]
    result = invoke("predict", str(images), "--json")  # the default: food-test@champion
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    assert output["model_uri"] == f"models:/{MODEL_NAME}@champion"
    paths = [images / "a.jpg", images / "b.png", images / "more" / "c.jpeg"]
    assert [entry["image"] for entry in output["images"]] == [str(p) for p in paths]
    expected = expected_probabilities(in_project["model_uri"], paths)
    for entry, row in zip(output["images"], expected):
        top = entry["predictions"]
        assert len(top) == len(CLASSES)  # --top-k 5 is capped at the 3 classes
        probabilities = [item["probability"] for item in top]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)
        for item in top:
            assert item["probability"] == pytest.approx(
                row[CLASSES.index(item["class_name"])], abs=1e-6)


def test_predict_text_top_k_and_model_uri(in_project: dict) -> None:
    image = in_project["images"] / "a.jpg"
    result = invoke("predict", str(image), "--top-k", "2", "--model-uri",
                    f"runs:/{in_project['run_id']}/model")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"model: runs:/{in_project['run_id']}/model"
    assert lines[1] == str(image)
    assert len(lines) == 4 and lines[2].startswith("  1. ") and lines[3].startswith("  2. ")
    row = expected_probabilities(in_project["model_uri"], [image])[0]
    best = CLASSES[int(np.argmax(row))]
    assert lines[2].split()[1] == best
    assert float(lines[2].split()[2]) == pytest.approx(row.max(), abs=1e-4)
    version = invoke("predict", str(image), "--json", "--model-uri", f"models:/{MODEL_NAME}/1")
    assert version.exit_code == 0, version.output


def _assert_one_line_error(result, *fragments: str, command: str = "predict") -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("foodtransfer")]
    assert len(lines) == 1 and lines[0].startswith(f"foodtransfer {command}: error: "), \
        result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_predict_missing_file(in_project: dict) -> None:
    _assert_one_line_error(invoke("predict", "no/such.jpg"),
                           "no/such.jpg: no such file or folder")


@pytest.mark.parametrize("content", [b"", b"plain text, not a JPEG", b"\xff\xd8\xff\xe0\x00"])
def test_predict_unreadable_image(in_project: dict, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    good = in_project["images"] / "a.jpg"
    # The good photo is classified first; then the bad one is named, exit 2.
    result = invoke("predict", str(good), str(bad))
    _assert_one_line_error(result, "1 of 2 images could not be read: ",
                           f"{bad}: cannot read it as an image")
    assert result.stdout.splitlines()[1] == str(good)
    assert result.stdout.splitlines()[2].startswith("  1. ")
    as_json = invoke("predict", str(good), str(bad), "--json")
    assert as_json.exit_code == 2
    output = json.loads(as_json.stdout)
    assert [entry["image"] for entry in output["images"]] == [str(good)]
    assert output["unreadable"][0].startswith(f"{bad}: cannot read it as an image")
    # Only bad photos: the same one line, and no model loaded for nothing.
    _assert_one_line_error(invoke("predict", str(bad)), f"{bad}: cannot read it as an image")


def test_predict_folder_without_images(in_project: dict, tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    _assert_one_line_error(invoke("predict", str(tmp_path)), "the folder holds no images")


@pytest.mark.parametrize("uri, fragment", [
    ("models:/no-such-model@champion", "no-such-model"),
    (f"models:/{MODEL_NAME}@no-such-alias", "no-such-alias"),
    ("runs:/" + "0" * 32 + "/model", "0" * 32),
    ("/no/such/model/folder", "/no/such/model/folder"),
])
def test_predict_unknown_model_uri(in_project: dict, uri: str, fragment: str) -> None:
    _assert_one_line_error(invoke("predict", str(in_project["images"]), "--model-uri", uri),
                           f"cannot load the model {uri}", fragment)


def test_predict_without_a_store_creates_none(project: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate(monkeypatch, tmp_path)
    _assert_one_line_error(invoke("predict", str(project["images"])),
                           "models:/food101-classifier@champion", "there is no MLflow store")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_predict_rejects_top_k_below_one(in_project: dict) -> None:
    result = invoke("predict", str(in_project["images"]), "--top-k", "0")
    assert result.exit_code == 2 and "--top-k" in result.output


# ----------------------------------------------------------------------------------- ui
def test_ui_dry_run_uses_the_project_store(in_project: dict) -> None:
    root = in_project["root"].resolve()
    result = invoke("ui", "--port", "5123", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "MLflow UI: http://127.0.0.1:5123" in result.stdout
    command = result.stdout.strip().splitlines()[-1]
    assert f"--backend-store-uri sqlite:///{root / 'mlruns' / 'mlflow.db'}" in command
    assert f"--default-artifact-root {(root / 'mlruns' / 'artifacts').as_uri()}" in command
    assert command.endswith("--host 127.0.0.1 --port 5123 --workers 1")  # one user: one worker


def test_sharing_beyond_loopback_says_what_is_exposed(in_project: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shared = invoke("ui", "--host", "0.0.0.0", "--port", "5124", "--dry-run")
    assert shared.exit_code == 0, shared.output
    assert ("warning: listening on 0.0.0.0:5124 without authentication: anyone who can reach "
            "this machine on port 5124 can read every run") in shared.stderr
    assert "move @champion" in shared.stderr and "docs/scale.md" in shared.stderr
    assert shared.stdout.strip().endswith("--host 0.0.0.0 --port 5124 --workers 1")
    assert "warning" not in invoke("ui", "--port", "5124", "--dry-run").output  # loopback
    # An address this machine does not have: one line, before anything starts.
    result = invoke("serve", "--host", "203.0.113.7", "--port", str(free_port()))
    _assert_one_line_error(result, "--host '203.0.113.7' is not an address of this machine",
                           command="serve")
    # The demo's login comes from a variable, user:password.
    monkeypatch.setenv("FOODTRANSFER_DEMO_AUTH", "alice")
    _assert_one_line_error(invoke("demo", "--port", str(free_port())),
                           "FOODTRANSFER_DEMO_AUTH must be user:password", command="demo")
    from foodtransfer.demo import demo_auth

    monkeypatch.setenv("FOODTRANSFER_DEMO_AUTH", "alice:s3:cret")
    assert demo_auth() == ("alice", "s3:cret")


def test_ui_honours_mlflow_tracking_uri(in_project: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    result = invoke("ui")
    assert result.exit_code == 0 and "open http://tracking.example:5000" in result.stdout
    other = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    result = invoke("ui", "--dry-run")
    assert result.exit_code == 0 and f"--backend-store-uri {other} " in result.stdout


def test_ui_busy_port_and_missing_store(in_project: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("ui", "--port", str(port))
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.output
    monkeypatch.chdir(tmp_path)
    result = invoke("ui", "--dry-run")
    assert result.exit_code == 2 and "There is no MLflow store" in result.output
    assert not (tmp_path / "mlruns").exists()


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "foodtransfer"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "predict" in result.stdout and "ui" in result.stdout


def test_sample_weights_refuses_a_file_name_keras_cannot_write(tmp_path: Path) -> None:
    """(The weights it writes are the suite's stand-in backbone: tests/standin.py makes them
    with this command.)"""
    target = tmp_path / "sample.h5"
    result = invoke("sample-weights", str(target))
    assert result.exit_code == 2, result.output
    assert f"foodtransfer sample-weights: error: {target}: the file name must end in " \
           ".weights.h5" in result.output
    assert not list(tmp_path.iterdir())
