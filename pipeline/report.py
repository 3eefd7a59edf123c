"""DVC stage `report`: compare the variants (reports/), group their MLflow runs, register the champion."""

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
        config = load_params(params)  # validate before importing MLflow and matplotlib
        from foodtransfer.report import ReportPaths, run_report

        return run_report(config, ReportPaths())

    run_stage("report", body)


if __name__ == "__main__":
    app()
