"""``foodtransfer demo``: the champion in a browser (Gradio), on loopback unless ``--host``.

Two tabs: *Classify a photo* (upload or drop a photo: the top 5 classes with their
probabilities, decoded and resized as ``foodtransfer predict`` does, from the same pyfunc) and
*Comparison* (the pipeline run's comparison of the variants, accuracy with 95 % intervals, and
the champion's most confident test mistakes: ``reports/comparison.md`` and ``errors.png`` as the
report logged them with the run that registered the model).

Gradio because it is made for this (an image in, a ranked label out: ``gr.Image`` and
``gr.Label``), serves from the same process as the model, and runs offline: analytics and the
version check are off, its fonts are local.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from foodtransfer.errors import UserError

TOP_K = 5
AUTH_ENV = "FOODTRANSFER_DEMO_AUTH"  # user:password: Gradio asks for that login
MAX_FILE_SIZE = "40mb"  # an upload over this is refused by Gradio before it is read whole


class DemoError(UserError):
    """The demo cannot start: gradio missing, or no model."""


@dataclass
class Report:
    comparison: str  # markdown
    errors_png: Path | None
    source: str  # where it was read


def demo_auth() -> tuple[str, str] | None:
    """The login Gradio asks for, from ``FOODTRANSFER_DEMO_AUTH=user:password``, or None."""
    value = os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, colon, password = value.partition(":")
    if not (user and colon and password):
        raise DemoError(f"{AUTH_ENV} must be user:password (both non-empty); got "
                        f"{len(value)} characters without that form.")
    return user, password


def report_for(model_uri: str, project: Path, scratch: Path) -> Report:
    """The report of the pipeline run that registered ``model_uri`` (its MLflow artifacts),
    else the project's ``reports/`` folder, else a note that there is none."""
    import mlflow

    from foodtransfer.tracking.registry import (CANDIDATE_TAG, PIPELINE_RUN_TAG,
                                                REPORT_ARTIFACTS, REPORT_FOLDER,
                                                registered_version)

    try:
        version = registered_version(model_uri)
        if version is not None:
            name = model_uri[len("models:/"):].split("@")[0].split("/")[0]
            found = mlflow.MlflowClient().get_model_version(name, version)
            # A production version: the report promotion copied beside it (the pipeline run
            # stays writable by its trainers); a candidate: its pipeline run's.
            copied = CANDIDATE_TAG in found.tags
            run_id = found.run_id if copied else found.tags.get(PIPELINE_RUN_TAG)
            folder = f"{REPORT_FOLDER}/" if copied else ""
            if run_id:
                files = {artifact: Path(mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=folder + artifact, dst_path=str(scratch)))
                    for artifact in REPORT_ARTIFACTS}
                return Report(files["comparison.md"].read_text(), files["errors.png"],
                              f"the report of pipeline run {run_id} (version {version})")
    except (mlflow.exceptions.MlflowException, OSError):
        pass
    reports = project / "reports"
    if (reports / "comparison.md").is_file():
        errors = reports / "errors.png"
        return Report((reports / "comparison.md").read_text(),
                      errors if errors.is_file() else None, f"{reports}")
    return Report(f"No pipeline report for {model_uri}: run `dvc repro` to make one.", None,
                  "none")


def build(model_uri: str, project: Path, scratch: Path):
    """The Gradio app for ``model_uri`` (loaded once, here)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as error:
        raise DemoError(f"the demo needs gradio ({error}): pip install 'foodtransfer[demo]' "
                        "(make install includes it).") from None

    from foodtransfer.predict import (ImageInputError, input_size, load_model, probabilities,
                                      read_images, top_k)

    side, _ = input_size(model_uri)
    model = load_model(model_uri)
    report = report_for(model_uri, project, scratch)

    def classify(path: str | None) -> dict[str, float] | None:
        if not path:
            return None
        try:
            frame = probabilities(model, read_images([Path(path)], side, side))
        except ImageInputError as error:
            raise gr.Error(str(error)) from None
        return dict(top_k(frame, TOP_K)[0])

    with gr.Blocks(title="foodtransfer: the champion", analytics_enabled=False) as app:
        gr.Markdown(f"## foodtransfer demo\nModel `{model_uri}` ({side} × {side} px input).")
        with gr.Tab("Classify a photo"):
            with gr.Row():
                # A path, not pixels, and no mode conversion: Gradio only reads the header,
                # and decode_image checks the size before anything is decoded.
                photo = gr.Image(type="filepath", image_mode=None,
                                 label="A food photo (upload or drop)",
                                 sources=["upload"], height=320, elem_id="photo")
                label = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K} classes",
                                 elem_id="prediction")
            photo.change(classify, inputs=photo, outputs=label)
        with gr.Tab("Comparison"):
            gr.Markdown(f"From {report.source}.", elem_id="report-source")
            gr.Markdown(report.comparison, elem_id="comparison")
            if report.errors_png is not None:
                gr.Image(str(report.errors_png), label="The champion's most confident test "
                         "mistakes", interactive=False, elem_id="mistakes")
    return app


def run(model_uri: str, port: int, project: Path, echo=print, host: str = "127.0.0.1",
        auth: tuple[str, str] | None = None) -> None:
    """Serve the demo on ``host``:``port`` until interrupted; with ``auth``, behind that
    login. Uploads over :data:`MAX_FILE_SIZE` are refused."""
    with tempfile.TemporaryDirectory(prefix="foodtransfer-demo-") as scratch:
        app = build(model_uri, project, Path(scratch))
        login = f", login {auth[0]}:***" if auth else ""
        echo(f"demo of {model_uri} at http://{host}:{port}/{login} (Ctrl-C stops it)")
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                   show_error=True, quiet=True, auth=auth, max_file_size=MAX_FILE_SIZE)
