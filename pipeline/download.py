"""DVC stage `download`: fetch (or generate) the archive, verify it, extract what is needed."""

from pathlib import Path

import typer

from foodtransfer.config import load_params
from foodtransfer.stage import run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
    out: Path = typer.Option(Path("data/raw"), help="Extracted images of the chosen classes."),
    cache: Path = typer.Option(Path("data/downloads"), help="Download cache (not a DVC output)."),
) -> None:
    def body() -> str:
        from foodtransfer.steps import run_download

        return run_download(load_params(params), out, cache)

    run_stage("download", body)


if __name__ == "__main__":
    app()
