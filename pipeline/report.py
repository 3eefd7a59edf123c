"""DVC stage `report`: compare the variants (reports/), group their MLflow runs, register the
champion.

Logic: src/foodtransfer/stages/report.py. Paths come from this stage's cmd in dvc.yaml.
"""

import sys
from pathlib import Path

# This tree's package, not the one `pip install -e .` points at: DVC's queue and --temp run
# the stage in a copy of the tree, which must run the copy's code (docs/pipeline.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer

from foodtransfer.config import load_params
from foodtransfer.errors import ConfigError
from foodtransfer.stages.runner import INPUT, OUTPUT, prepare_tensorflow, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    trimmed: Path = typer.Option(..., rich_help_panel=INPUT,
                                 help="The trim stage's image stores."),
    split: Path = typer.Option(..., rich_help_panel=INPUT, help="The split stage's manifests."),
    metrics: list[Path] = typer.Option(..., rich_help_panel=INPUT,
                                       help="Each variant's metrics file, in report order."),
    plots: list[Path] = typer.Option(..., rich_help_panel=INPUT,
                                     help="Each variant's plots folder, same order."),
    artifacts: list[Path] = typer.Option(..., rich_help_panel=INPUT,
                                         help="Each variant's artifacts folder, same order."),
    out: Path = typer.Option(..., rich_help_panel=OUTPUT, help="The report folder."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    prepare_tensorflow()

    def body() -> str:
        config = load_params(params)  # validate before importing MLflow and matplotlib
        if not len(metrics) == len(plots) == len(artifacts):
            raise ConfigError(f"report: give one --metrics, --plots and --artifacts per variant "
                              f"(got {len(metrics)}, {len(plots)} and {len(artifacts)}).")
        from foodtransfer.stages.report import VariantSource, run

        sources = [VariantSource(*paths) for paths in zip(metrics, plots, artifacts)]
        return run(config, trimmed, split, sources, out)

    run_stage("report", body)


if __name__ == "__main__":
    app()
