"""DVC stage `trim`: decode the chosen classes' images once into image stores.

Logic: src/foodtransfer/stages/trim.py. Paths come from this stage's cmd in dvc.yaml.
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
    raw: Path = typer.Option(..., rich_help_panel=INPUT,
                             help="The download stage's extracted archive."),
    out: Path = typer.Option(..., rich_help_panel=OUTPUT,
                             help="Image stores, manifests, classes and skipped-file report."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    def body() -> str:
        from foodtransfer.stages.trim import run

        return run(load_params(params), raw, out)

    run_stage("trim", body)


if __name__ == "__main__":
    app()
