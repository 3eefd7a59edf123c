"""The ``foodtransfer`` command: use what the pipeline produced.

- ``foodtransfer predict IMAGE_OR_DIR... [--model-uri URI] [--top-k 5] [--json]``: the top-k
  classes of each image, by default with the registry's champion.
- ``foodtransfer compare [EXPERIMENT...]``: pipeline runs aggregated over seeds and sweeps.
- ``foodtransfer results SPEC [--run]``: a results page from the MLflow store (a spec in
  docs/results/).
- ``foodtransfer sweep -S KEY=V1,V2 ...``: a grid of DVC experiments on a Dask cluster, then
  compare.
- ``foodtransfer promote VERSION|RUN_ID|EXP_NAME``: copy that candidate version into the
  production model and move ``@champion`` to it, with a paired comparison on validation
  against the champion it replaces.
- ``foodtransfer serve [--model-uri URI] [--port 5001]``: the champion over HTTP (MLflow's
  scoring server, localhost).
- ``foodtransfer export [--out DIR] [--format onnx]``: the champion as a TensorFlow SavedModel
  (TF Serving) or ONNX.
- ``foodtransfer demo [--port 7860]``: the champion in a web page (Gradio), on localhost.
- ``foodtransfer ui [--port 5000]``: the MLflow UI on this project's store, on localhost.

Errors a user can fix print one line (``foodtransfer <command>: error: ...``) and exit with
code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import typer

from foodtransfer.errors import UserError
from foodtransfer.stages.runner import prepare_tensorflow

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Use the models and runs of the foodtransfer pipeline.")


@app.callback()
def main() -> None:
    """Use the models and runs of the foodtransfer pipeline."""


@contextlib.contextmanager
def _user_errors(command: str) -> Iterator[None]:
    try:
        yield
    except UserError as error:
        typer.secho(f"foodtransfer {command}: error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def _default_model_uri(params_path: Path) -> str:
    """The champion of the registered model named in params.yaml (or the default name)."""
    from foodtransfer.tracking.registry import champion_uri

    return champion_uri(_params_or_defaults(params_path).mlflow.registered_model)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., metavar="IMAGE_OR_DIR",
                                        help="Image files, or folders searched recursively."),
    model_uri: str | None = typer.Option(
        None, "--model-uri",
        help="MLflow model URI (models:/<name>@<alias>, models:/<name>/<version>, "
             "runs:/<run_id>/model, a local model folder). Default: "
             "models:/<mlflow.registered_model>@champion."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes to show per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the default model's registry name is read."),
) -> None:
    """Print the top-k classes with probabilities of each image."""
    prepare_tensorflow()
    with _user_errors("predict"):
        from foodtransfer.predict import format_text, predict_files

        uri = model_uri or _default_model_uri(params)
        predictions, unreadable = predict_files(images, uri, top_k)
    if as_json:
        typer.echo(json.dumps({"model_uri": uri,
                               "images": [p.as_dict() for p in predictions],
                               "unreadable": unreadable}, indent=2))
    else:
        typer.echo(f"model: {uri}")
        typer.echo(format_text(predictions))
    if unreadable:  # the readable ones are classified above; then the others, exit 2
        typer.secho(f"foodtransfer predict: error: {len(unreadable)} of "
                    f"{len(unreadable) + len(predictions)} images could not be read: "
                    + " ".join(unreadable), err=True, fg=typer.colors.RED)
        raise typer.Exit(2)


def _params_or_defaults(params_path: Path):
    from foodtransfer.config import Params, load_params

    return load_params(params_path) if params_path.is_file() else Params()


@app.command()
def compare(
    experiments: list[str] = typer.Argument(
        None, metavar="[EXPERIMENT]...",
        help="DVC experiment names or MLflow pipeline run ids (default: every pipeline run)."),
    experiment: str | None = typer.Option(
        None, "--experiment", help="MLflow experiment (default: mlflow.experiment in params)."),
    data_version: str | None = typer.Option(
        None, "--data-version", help="Only the runs on this data version (a prefix is enough)."),
    where: list[str] = typer.Option(
        None, "--where", metavar="KEY=VALUE",
        help="Only the runs with this param value, e.g. --where features.views=2 (repeatable)."),
    pool_code_versions: bool = typer.Option(
        False, "--pool-code-versions",
        help="Average runs of different code as one configuration (by default runs whose "
             "code differs, tag code_version, are kept apart)."),
    against: str | None = typer.Option(
        None, "--against", metavar="KEY=VALUE",
        help="The configuration the others are compared with, by its swept params (e.g. "
             "--against dropout=0.6; default: the first)."),
    out: Path = typer.Option(Path("reports"), "--out",
                             help="Where experiments.md, .csv and .png go."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the default MLflow experiment is read."),
) -> None:
    """Aggregate pipeline runs (seeds, sweeps): mean ± sd over seeds, pooled intervals, the
    metric against a swept param; logged as an MLflow run 'comparison'."""
    with _user_errors("compare"):
        from foodtransfer.compare import compare as compare_runs

        name = experiment or _params_or_defaults(params).mlflow.experiment
        summary, _ = compare_runs(list(experiments or []), name, out, data_version,
                               list(where or []), pool_code_versions=pool_code_versions,
                               against=against)
    typer.echo(f"compare: {summary}")


@app.command()
def results(
    spec: Path = typer.Argument(..., metavar="SPEC",
                                help="A results spec, e.g. docs/results/mini8.yaml."),
    run: bool = typer.Option(False, "--run",
                             help="Queue and run every configuration x seed first (DVC)."),
    out: Path | None = typer.Option(None, "--out",
                                    help="Where the page goes (default: next to SPEC, "
                                         "a folder named after it)."),
) -> None:
    """Write a results page (compare's tables and figure under a header naming SPEC) from
    the MLflow store; with --run, run its experiments first."""
    with _user_errors("results"):
        from foodtransfer.resultspage import load_spec, run_spec, write_page

        loaded = load_spec(spec)
        if run:
            run_spec(loaded, echo=typer.echo)
        summary = write_page(loaded, spec, out or spec.with_suffix(""))
    typer.echo(f"results: {summary}")


@app.command()
def sweep(
    targets: list[str] = typer.Argument(
        None, metavar="[TARGET]...", help="Stages to run up to (default: the whole pipeline)."),
    set_params: list[str] = typer.Option(
        ..., "-S", "--set-param", metavar="KEY=V1,V2",
        help="DVC's grid syntax: one experiment per combination (repeatable)."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", metavar="ADDRESS",
        help="A Dask scheduler (tcp://host:8786; env FOODTRANSFER_SCHEDULER). Default: a "
             "local cluster, one worker per GPU (or one)."),
    workers: int | None = typer.Option(None, "--workers", min=1,
                                       help="Workers of the local cluster."),
    git_remote: str | None = typer.Option(
        None, "--git-remote", help="Where workers clone and push (default: origin)."),
    dvc_remote: str | None = typer.Option(
        None, "--dvc-remote", help="Where workers pull and push data (default: DVC's default "
                                   "remote)."),
    out: Path = typer.Option(Path("reports"), "--out",
                             help="Where compare writes experiments.md, .csv and .png."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the MLflow experiment to compare is read."),
) -> None:
    """Run a grid of DVC experiments on a Dask cluster's workers, then compare them."""
    with _user_errors("sweep"):
        from foodtransfer.compare import compare as compare_runs
        from foodtransfer.compare import compare_without_report
        from foodtransfer.sweep import sweep as run_sweep

        outcome = run_sweep(list(set_params), Path.cwd(), scheduler=scheduler, workers=workers,
                            targets=list(targets or []), git_remote=git_remote,
                            dvc_remote=dvc_remote, echo=typer.echo)
        compared = [item["pipeline_run"] for item in outcome.done if item["pipeline_run"]]
        if outcome.done:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            name = _params_or_defaults(params).mlflow.experiment
            if compared:
                summary, text = compare_runs(sorted(set(compared)), name, out)
            else:  # the targets stop before the report: its variant runs
                summary, text = compare_without_report(
                    [item["name"] for item in outcome.done], name, out)
            typer.echo(f"compare: {summary}")
            typer.echo(text[text.find("| "):].split("\n\n")[0])  # its first table
    if outcome.failed:
        typer.secho(f"foodtransfer sweep: {len(outcome.failed)} of "
                    f"{len(outcome.failed) + len(outcome.done)} experiments failed: "
                    f"{', '.join(outcome.failed)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command()
def promote(
    reference: str = typer.Argument(..., metavar="VERSION|RUN_ID|EXP_NAME",
                                    help="A candidate's version number (of "
                                         "<mlflow.registered_model>-candidates), the MLflow "
                                         "run id it came from, or a DVC experiment name (on "
                                         "a tracking server: the version number only)."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the registered model's name is read."),
) -> None:
    """Copy a candidate version into the production model (its Keras model and class names,
    in this installation's pyfunc) and point its @champion at the copy (what predict, serve
    and demo use), after a paired comparison with the champion it replaces on the validation
    images."""
    with _user_errors("promote"):
        from foodtransfer.promote import promote as promote_version
        from foodtransfer.tracking.store import connect_existing

        config = _params_or_defaults(params)
        connect_existing(config.mlflow.experiment)
        typer.echo(promote_version(reference, config.mlflow.registered_model))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
HOST_HELP = ("Address to listen on: 127.0.0.1 (this machine only) by default; 0.0.0.0 or an "
             "interface's address shares it (read the warning it prints).")


def _warn_if_exposed(host: str, port: int, exposed: str, fix: str) -> None:
    """Binding anything but loopback shares ``exposed`` with whoever reaches ``host``: say
    so, and how to protect it."""
    if host not in LOOPBACK:
        typer.echo(f"warning: listening on {host}:{port} without authentication: anyone who "
                   f"can reach this machine on port {port} {exposed}. {fix}", err=True)


@app.command()
def serve(
    model_uri: str | None = typer.Option(
        None, "--model-uri", help="MLflow model URI (default: the registry's champion)."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    max_request_mb: float = typer.Option(
        40, "--max-request-mb", min=0.001,
        help="Largest request body read (MiB); a larger one gets 413 before it is parsed."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the default model's registry name is read."),
) -> None:
    """Serve the champion over HTTP (MLflow's scoring server): POST
    `{"inputs": {"image": [base64 photo, ...]}}` (or decoded pixels) to /invocations; /ping
    says it is up."""
    from foodtransfer.serving import serve_command, serve_environment

    with _user_errors("serve"):
        uri = _model_on_free_port(model_uri, params, host, port)
        command = serve_command(uri, host, port)
    _warn_if_exposed(host, port, "can send photos to the model and read its class names",
                     "Put it behind a reverse proxy with TLS and authentication "
                     "(docs/serving.md).")
    typer.echo(f"serving {uri} at http://{host}:{port}/invocations (POST {{\"inputs\": "
               "{\"image\": [base64 photo, ...]}}; /ping; Ctrl-C stops it)")
    env = serve_environment(uri, int(max_request_mb * 1024 * 1024))
    raise typer.Exit(_run_until_stopped(command, env=env))


@app.command()
def demo(
    model_uri: str | None = typer.Option(
        None, "--model-uri", help="MLflow model URI (default: the registry's champion)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the default model's registry name is read."),
) -> None:
    """A web page for the champion (Gradio): upload a photo, see its top 5 classes; the
    comparison of the variants and the champion's most confident mistakes. Set
    FOODTRANSFER_DEMO_AUTH=user:password to ask for a login."""
    prepare_tensorflow()
    with _user_errors("demo"):
        from foodtransfer.demo import AUTH_ENV, demo_auth
        from foodtransfer.demo import run as run_demo

        auth = demo_auth()
        uri = _model_on_free_port(model_uri, params, host, port)
        if auth is None:
            _warn_if_exposed(host, port, "can classify photos with the model and read its "
                             "comparison report and test mistakes",
                             f"Set {AUTH_ENV}=user:password to ask for a login, and put TLS "
                             "in front of it (docs/serving.md).")
        run_demo(uri, port, Path.cwd(), echo=typer.echo, host=host, auth=auth)


@app.command()
def export(
    out: Path = typer.Option(Path("models/export/food101"), "--out",
                             help="Model folder: the version goes in a subfolder."),
    fmt: str = typer.Option("saved_model", "--format",
                            help="saved_model (TF Serving) or onnx (onnxruntime and others)."),
    model_uri: str | None = typer.Option(
        None, "--model-uri", help="MLflow model URI (default: the registry's champion)."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the default model's registry name is read."),
) -> None:
    """Write the champion as a TensorFlow SavedModel that TF Serving loads, or as ONNX."""
    prepare_tensorflow()
    with _user_errors("export"):
        from foodtransfer.serving import export_model, tf_serving_hint

        uri = model_uri or _default_model_uri(params)
        target = export_model(uri, out, fmt)
    if fmt == "onnx":
        typer.echo(f"exported {uri} to {target / 'model.onnx'} (input float32 images "
                   "(n, size, size, 3), pixels 0..255 -> class probabilities; class names in "
                   f"{target / 'classes.json'})")
        return
    typer.echo(f"exported {uri} to {target} (signature 'serve': float32 images "
               "(n, size, size, 3), pixels 0..255 -> class probabilities; class names in "
               "assets.extra/classes.json)")
    typer.echo(tf_serving_hint(out))


@app.command("sample-weights")
def sample_weights(
    out: Path = typer.Argument(Path("weights/sample-mobilenetv2.weights.h5"),
                               help="The weights file to write (in weights/, for DVC)."),
) -> None:
    """Make learnable MobileNetV2 weights offline (pretrained on 8 generated classes, under a
    minute on 2 cores): what `make repro-sample` and the tutorial use instead of ImageNet's."""
    prepare_tensorflow()
    with _user_errors("sample-weights"):
        if not out.name.endswith(".weights.h5"):
            raise UserError(f"{out}: the file name must end in .weights.h5 (Keras' weights "
                            "format), e.g. weights/sample-mobilenetv2.weights.h5.")
        from foodtransfer.models.sample_weights import SOURCE_CLASSES, pretrain

        accuracy = pretrain(out)
    typer.echo(f"wrote {out}: MobileNetV2 pretrained on {SOURCE_CLASSES} generated classes "
               f"(training accuracy {accuracy:.2f}); use it with -S backbone=MobileNetV2 "
               f"-S weights={out} (dvc add {out} to track it)")


def _model_on_free_port(model_uri: str | None, params: Path, host: str, port: int) -> str:
    """The model to serve (``model_uri``, else the champion), after checking ``port`` is free."""
    uri = model_uri or _default_model_uri(params)
    if not _port_free(host, port):
        raise UserError(f"port {port} on {host} is in use: pass --port {port + 1}.")
    return uri


def _port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` (an address this machine has)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--host {host!r} is not an address of this machine ({error}): "
                        "pass 127.0.0.1, 0.0.0.0 or one of its interfaces' addresses.") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host!r} is not an address of this machine: pass "
                                "127.0.0.1, 0.0.0.0 or one of its interfaces' addresses."
                                ) from None
            return False
    return True


@app.command()
def ui(
    port: int = typer.Option(5000, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print the URL and the command, start nothing."),
    params: Path = typer.Option(Path("params.yaml"),
                                help="Where the MLflow experiment's name is read."),
) -> None:
    """Start the MLflow UI on this project's store and print the URL of the experiment's
    runs."""
    import os

    from foodtransfer.tracking.store import tracking_uri
    from foodtransfer.tracking.ui import UI_ENVIRONMENT, runs_url, ui_command

    with _user_errors("ui"):
        command, url = ui_command(port, host)
        url = runs_url(url, _experiment_id(_params_or_defaults(params).mlflow.experiment))
        if not command:
            typer.echo(f"MLFLOW_TRACKING_URI names a tracking server: open {url}")
            return
        if not dry_run and not _port_free(host, port):
            raise UserError(f"port {port} on {host} is in use (another MLflow UI?): pass "
                            f"--port {port + 1}, or open {url} if it is already this UI.")
    if command:
        _warn_if_exposed(host, port, "can read every run, artifact and model of this store, "
                         "change or delete them and move @champion",
                         "For a team, run MLflow's authenticated server instead "
                         "(docs/scale.md).")
    typer.echo(f"MLflow UI: {url} (store {tracking_uri()}; Ctrl-C stops it)")
    if dry_run:
        typer.echo(" ".join(command))
        return
    raise typer.Exit(_run_until_stopped(command, env={**os.environ, **UI_ENVIRONMENT}))


def _experiment_id(name: str) -> str | None:
    """The id of the MLflow experiment ``name`` in the project's store, or None (no store,
    no such experiment, a server that does not answer)."""
    import os

    from foodtransfer.tracking.store import connect_existing

    before = os.environ.get("MLFLOW_TRACKING_URI")  # MLflow's set_tracking_uri exports it
    try:
        return connect_existing(name)
    except UserError:
        return None
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _run_until_stopped(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in the foreground; Ctrl-C or SIGTERM stops it (and its workers)."""
    process = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the child as well
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    app()
