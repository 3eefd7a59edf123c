"""The training heuristics (foodtransfer.training.hyperrule): pure functions, checked on
their own, without TensorFlow."""

from __future__ import annotations

import pytest

from foodtransfer.training import hyperrule


@pytest.mark.parametrize(("examples", "batch", "steps"), [(0, 32, 0), (1, 32, 1), (32, 32, 1),
                                                           (33, 32, 2), (960, 32, 30),
                                                           (961, 32, 31), (5, 1, 5)])
def test_steps_per_epoch_counts_the_partial_last_batch(examples: int, batch: int,
                                                       steps: int) -> None:
    assert hyperrule.steps_per_epoch(examples, batch) == steps


@pytest.mark.parametrize(("examples", "batch"), [(-1, 32), (10, 0)])
def test_steps_per_epoch_rejects_impossible_sizes(examples: int, batch: int) -> None:
    with pytest.raises(ValueError, match="need examples >= 0 and batch_size >= 1"):
        hyperrule.steps_per_epoch(examples, batch)


@pytest.mark.parametrize(("patience", "plateau"), [(1, 1), (2, 1), (3, 1), (5, 1), (6, 2),
                                                    (10, 3), (30, 10)])
def test_plateau_patience_is_a_third_of_early_stopping(patience: int, plateau: int) -> None:
    assert hyperrule.plateau_patience(patience) == plateau
    # The rate can drop at least once before early stopping gives up (for patience >= 2).
    assert plateau < patience or patience == 1


def test_cosine_decays_over_the_whole_run_and_never_over_zero_steps() -> None:
    assert hyperrule.cosine_decay_steps(10, 30) == 300
    assert hyperrule.cosine_decay_steps(0, 30) == 1
    assert hyperrule.cosine_decay_steps(5, 0) == 1


def test_finetune_learning_rate_scales_the_head_rate() -> None:
    assert hyperrule.finetune_learning_rate(1e-3, 0.1) == pytest.approx(1e-4)
    assert hyperrule.finetune_learning_rate(0.01, 1.0) == pytest.approx(0.01)
