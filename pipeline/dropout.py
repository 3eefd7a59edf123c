"""DVC stage `dropout`: the transfer head with Dropout(dropout) and an L1L2(l1, l2) kernel regulariser."""

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
        from foodtransfer.variants import Paths, run_head

        return run_head(config, Paths(), "dropout")

    run_stage("dropout", body)


if __name__ == "__main__":
    app()
