"""DVC stage `trim`: pick and decode the images of the chosen classes, once."""

from pathlib import Path

import typer

from foodtransfer.config import load_params
from foodtransfer.stage import run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
    raw: Path = typer.Option(Path("data/raw"), help="Output of the download stage."),
    out: Path = typer.Option(Path("data/trimmed"), help="Decoded image stores and manifests."),
) -> None:
    def body() -> str:
        from foodtransfer.steps import run_trim

        return run_trim(load_params(params), raw, out)

    run_stage("trim", body)


if __name__ == "__main__":
    app()
