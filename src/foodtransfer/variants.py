"""The variants the pipeline compares, declared once.

Each variant is a DVC stage of its name (``pipeline/<name>.py`` → ``stages/<name>.py``) that
writes ``metrics/<name>.json``, ``plots/<name>/``, ``artifacts/<name>/`` and
``models/<name>/`` and logs one MLflow run with its model. Everything that lists variants
reads this registry: the report (its table, paired tests, figures and the champion's choice),
``foodtransfer compare``, the plots' colours, the DAG test (the report stage's block in
dvc.yaml must name exactly these) and the end-to-end tests. docs/extending.md adds one.
"""

from __future__ import annotations

from dataclasses import dataclass

from foodtransfer.errors import DataError


@dataclass(frozen=True)
class Variant:
    name: str  # the stage, its script and module, its output folders, its MLflow run
    summary: str  # what it is, in a line
    frozen_backbone: bool  # a head on the frozen backbone's cached features
    starts_from: str | None = None  # the variant whose trained model it continues
    color: str = "tab:purple"  # its colour in the report's figures


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "a small CNN trained from scratch on the images", False,
            color="tab:grey"),
    Variant("transfer", "a softmax head on the frozen ImageNet backbone's features", True,
            color="tab:blue"),
    Variant("dropout", "the head with Dropout and an L1L2 kernel regulariser", True,
            color="tab:orange"),
    Variant("finetune", "the dropout model with the top of the backbone unfrozen", False,
            starts_from="dropout", color="tab:green"),
)
NAMES: tuple[str, ...] = tuple(variant.name for variant in VARIANTS)
COLORS: dict[str, str] = {variant.name: variant.color for variant in VARIANTS}


def get(name: str) -> Variant:
    """The registered variant ``name``, or a DataError naming the registered ones."""
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise DataError(f"{name!r} is not a registered variant ({', '.join(NAMES)}): add it to "
                    "VARIANTS in src/foodtransfer/variants.py (docs/extending.md).")
