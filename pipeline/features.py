"""DVC stage `features`: run the frozen backbone once over every image; cache the pooled features.

Logic: src/foodtransfer/stages/features.py. Paths come from this stage's cmd in dvc.yaml.
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
    out: Path = typer.Option(..., rich_help_panel=OUTPUT,
                             help="Cached features train/val/test.npy and meta.json."),
    bottom_out: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                    help="The fine-tune's frozen-bottom cache (data/bottom)."),
    metrics: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                 help="Extraction timings (metrics/features.json)."),
    weights_folder: Path = typer.Option(
        Path("weights"), rich_help_panel=INPUT,
        help="Local weights files: the weights param may name a file here, nowhere else."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    prepare_tensorflow()

    def body() -> str:
        config = load_params(params)  # validate before importing TensorFlow
        check_weights_folder(config.weights, weights_folder)
        from foodtransfer.stages.features import run

        return run(config, trimmed, split, out, metrics, bottom_out)

    run_stage("features", body)


if __name__ == "__main__":
    app()
