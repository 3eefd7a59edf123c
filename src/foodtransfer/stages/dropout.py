"""Stage ``dropout``: the transfer head with ``Dropout(dropout)`` and an ``L1L2(l1, l2)``
kernel regulariser (top-level params ``dropout``, ``l1``, ``l2``), trained as the transfer
stage trains its head."""

from __future__ import annotations

from pathlib import Path

from foodtransfer.config import Params
from foodtransfer.results import VariantPaths
from foodtransfer.stages.transfer import train_head


def run(params: Params, trimmed: Path, split: Path, features: Path,
        outputs: VariantPaths) -> str:
    return train_head(params, "dropout", trimmed=trimmed, split=split, features=features,
                      outputs=outputs, dropout=params.dropout, l1=params.l1, l2=params.l2)
