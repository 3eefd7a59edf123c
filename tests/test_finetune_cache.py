"""The fine-tune shortcut: a frozen bottom computed once must give exactly what the full
backbone gives, and the cut must leave every trainable layer above it."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from foodtransfer.models.classifiers import (build_feature_extractor, get_backbone_model,
                                             split_frozen_bottom, unfreeze_top)


@pytest.fixture(scope="module")
def extractor(standin_weights):
    # Learned weights: random ones give outputs of ~1e-12, equal to anything at atol=1e-6.
    return build_feature_extractor("MobileNetV2", str(standin_weights), 32)


# 22 lands inside block 15, whose input also feeds a residual add: the cut must move down.
@pytest.mark.parametrize("unfreeze", [5, 22, 30])
def test_cut_reproduces_the_backbone_exactly(extractor, unfreeze):
    backbone = get_backbone_model(extractor)
    unfreeze_top(backbone, unfreeze)
    parts = split_frozen_bottom(backbone)
    assert parts is not None
    bottom, top = parts
    assert not bottom.trainable_weights
    # Every trainable weight of the backbone lives in the top part.
    top_ids = {id(w) for w in top.trainable_weights}
    assert {id(w) for w in backbone.trainable_weights} <= top_ids
    images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    full = keras.ops.convert_to_numpy(backbone(images, training=False))
    split = keras.ops.convert_to_numpy(top(bottom(images, training=False), training=False))
    assert np.abs(full).max() > 0.05  # outputs of a learned backbone, not ~0
    np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-6)


def test_no_cut_when_everything_is_trainable(extractor):
    backbone = get_backbone_model(extractor)
    unfreeze_top(backbone, "all")
    assert split_frozen_bottom(backbone) is None
