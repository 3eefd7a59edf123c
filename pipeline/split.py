"""DVC stage `split`: stratified, seeded train/validation split; the official test list
is held out.

Logic: src/foodtransfer/stages/split.py. Paths come from this stage's cmd in dvc.yaml.
"""

import sys
from pathlib import Path

# This tree's package, not the one `pip install -e .` points at: DVC's queue and --temp run
# the stage in a copy of the tree, which must run the copy's code (docs/pipeline.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer

from foodtransfer.config import load_params
from foodtransfer.stages.runner import INPUT, OUTPUT, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    trimmed: Path = typer.Option(..., rich_help_panel=INPUT, help="The trim stage's output."),
    out: Path = typer.Option(..., rich_help_panel=OUTPUT,
                             help="Split manifests train/val/test.csv."),
    metrics: Path = typer.Option(..., rich_help_panel=OUTPUT,
                                 help="Class counts per split (metrics/split.json)."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    def body() -> str:
        from foodtransfer.stages.split import run

        return run(load_params(params), trimmed, out, metrics)

    run_stage("split", body)


if __name__ == "__main__":
    app()
