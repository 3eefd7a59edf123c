"""DVC stage `split`: stratified train/validation split, test set from the official list."""

from pathlib import Path

import typer

from foodtransfer.config import load_params
from foodtransfer.stage import run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
    trimmed: Path = typer.Option(Path("data/trimmed"), help="Output of the trim stage."),
    out: Path = typer.Option(Path("data/split"), help="train/val/test manifests."),
    metrics: Path = typer.Option(Path("metrics/split.json"), help="Class counts per split."),
) -> None:
    def body() -> str:
        from foodtransfer.steps import run_split

        return run_split(load_params(params), trimmed, out, metrics)

    run_stage("split", body)


if __name__ == "__main__":
    app()
