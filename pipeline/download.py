"""DVC stage `download`: fetch (or generate) the archive, verify it, extract what is needed.

Logic: src/foodtransfer/stages/download.py. Paths come from this stage's cmd in dvc.yaml.
"""

import sys
from pathlib import Path

# This tree's package, not the one `pip install -e .` points at: DVC's queue and --temp run
# the stage in a copy of the tree, which must run the copy's code (docs/pipeline.md).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer

from foodtransfer.config import load_params
from foodtransfer.stages.runner import CACHE, OUTPUT, run_stage

app = typer.Typer(add_completion=False)


@app.command()
def main(
    out: Path = typer.Option(..., rich_help_panel=OUTPUT,
                             help="Extracted meta/ and images of the chosen classes."),
    cache: Path = typer.Option(..., rich_help_panel=CACHE,
                               help="Download cache (not a DVC output: a cut download resumes)."),
    params: Path = typer.Option(Path("params.yaml"), help="Validated params file."),
) -> None:
    def body() -> str:
        from foodtransfer.stages.download import run

        return run(load_params(params), out, cache)

    run_stage("download", body)


if __name__ == "__main__":
    app()
