"""DVC stage `transfer`: a softmax head on the cached features of the frozen backbone.

Logic: src/foodtransfer/stages/transfer.py. Paths come from this stage's cmd in dvc.yaml.
"""

import sys
from pathlib import Path

# This tree's package, not the one `pip install -e .` points at: DVC's queue and --temp run
# the stage in a copy of the tree, which must run the copy's code (docs/pipeline.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer

from foodtransfer.config import check_weights_folder, load_params
from foodtransfer.stages.runner import INPUT, OUTPUT, prepare_tensorflow, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    trimmed: Path = typer.Option(..., rich_help_panel=INPUT,
                                 help="The trim stage's image stores."),
    split: Path = typer.Option(..., rich_help_panel=INPUT, help="The split stage's manifests."),
    features: Path = typer.Option(..., rich_help_panel=INPUT,
                                  help="The features stage's cached features."),
    metrics: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                 help="Metrics file (metrics/<variant>.json)."),
    plots: Path = typer.Option(..., rich_help_panel=OUTPUT,
                               help="Plots folder (history.csv, predictions.csv)."),
    artifacts: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                   help="Figures, report, class names, MLflow run id."),
    model: Path = typer.Option(..., rich_help_panel=OUTPUT,
                               help="Model folder (model.keras, classes.json)."),
    weights_folder: Path = typer.Option(
        Path("weights"), rich_help_panel=INPUT,
        help="Local weights files: the weights param may name a file here, nowhere else."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    prepare_tensorflow()

    def body() -> str:
        config = load_params(params)  # validate before importing TensorFlow
        check_weights_folder(config.weights, weights_folder)
        from foodtransfer.results import VariantPaths
        from foodtransfer.stages.transfer import run

        return run(config, trimmed, split, features,
                   VariantPaths(metrics, plots, artifacts, model))

    run_stage("transfer", body)


if __name__ == "__main__":
    app()
