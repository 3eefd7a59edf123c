"""DVC stage `finetune`: the dropout model with the top of the backbone unfrozen, at a small
learning rate.

Logic: src/foodtransfer/stages/finetune.py. Paths come from this stage's cmd in dvc.yaml.
"""

import sys
from pathlib import Path

# This tree's package, not the one `pip install -e .` points at: DVC's queue and --temp run
# the stage in a copy of the tree, which must run the copy's code (docs/pipeline.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer

from foodtransfer.config import load_params
from foodtransfer.stages.runner import INPUT, OUTPUT, prepare_tensorflow, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    trimmed: Path = typer.Option(..., rich_help_panel=INPUT,
                                 help="The trim stage's image stores."),
    split: Path = typer.Option(..., rich_help_panel=INPUT, help="The split stage's manifests."),
    bottom: Path = typer.Option(..., rich_help_panel=INPUT,
                                help="The features stage's frozen-bottom cache (data/bottom)."),
    start_model: Path = typer.Option(..., rich_help_panel=INPUT,
                                     help="The model it starts from (models/dropout)."),
    start_history: Path = typer.Option(..., rich_help_panel=INPUT,
                                       help="That model's history.csv (the curves continue it)."),
    metrics: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                 help="Metrics file (metrics/<variant>.json)."),
    plots: Path = typer.Option(..., rich_help_panel=OUTPUT,
                               help="Plots folder (history.csv, predictions.csv)."),
    artifacts: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                   help="Figures, report, class names, MLflow run id."),
    model: Path = typer.Option(..., rich_help_panel=OUTPUT,
                               help="Model folder (model.keras, classes.json)."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    prepare_tensorflow()

    def body() -> str:
        config = load_params(params)  # validate before importing TensorFlow
        from foodtransfer.results import VariantPaths
        from foodtransfer.stages.finetune import run

        return run(config, trimmed, split, bottom, start_model, start_history,
                   VariantPaths(metrics, plots, artifacts, model))

    run_stage("finetune", body)


if __name__ == "__main__":
    app()
