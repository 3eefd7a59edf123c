"""DVC stage `baseline`: a CNN trained from scratch on the images (and the untrained model as chance reference)."""

from pathlib import Path

import typer

from foodtransfer.config import load_params
from foodtransfer.stage import prepare_tensorflow, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    prepare_tensorflow()

    def body() -> str:
        config = load_params(params)  # validate before importing TensorFlow
        from foodtransfer.variants import Paths, run_baseline

        return run_baseline(config, Paths())

    run_stage("baseline", body)


if __name__ == "__main__":
    app()
