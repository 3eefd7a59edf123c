"""DVC stage `finetune`: the dropout model with the top of the backbone unfrozen, at a small learning rate."""

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
        from foodtransfer.variants import Paths, run_finetune

        return run_finetune(config, Paths())

    run_stage("finetune", body)


if __name__ == "__main__":
    app()
