"""PyTorch and TensorFlow compute the same thing, for EVERY model in common.configs.MODELS.

On the ``random_dataset`` fixture (4 categorical, 2 numeric, 1 sequence field),
with small configs (only the keys a model's config dataclass has are passed):

(a) same seed -> identical initial weights; same weights + same batch -> logits
    within 1e-5 (float32) in eval mode and in train mode (batch statistics), and
    equal batch-norm moving statistics after the train-mode forward;
(b) gradients of BCE + penalty (l2, l2_embedding > 0) w.r.t. every parameter
    within 1e-4 relative;
(c) 50 optimiser steps (Adam, LazyAdam) through the real train steps on the same
    batches of the shared data layer -> weights within 1e-4 relative and
    validation AUC within 1e-3;
(d) weights torch -> tf -> torch round-trip bit-exactly and predict the same.

A model registered in common.configs is tested here automatically; one whose
module is missing in a backend fails (it is not skipped).

The checks themselves (and their bars) live in ``tests/parity_utils.py``, shared
with ``benchmarks/zoo_table.py``, which reports the same figures per model.
"""
from __future__ import annotations

import pytest

from common.configs import MODELS
from parity_utils import forward_check, gradient_check, parity_data, roundtrip_check, training_check

MODEL_NAMES = list(MODELS)
# non-default switches that add parameters or branches: (model, config overrides)
VARIANTS = [("AutoInt", {"use_wide": True})]


# ----- data: the same batches from both loaders ------------------------------------------------
@pytest.fixture(scope="module")
def data(random_dataset):
    return parity_data(random_dataset)


# ----- (a) forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_parity(name, data):
    forward_check(name, data)


# ----- (b) gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_parity(name, data):
    """Relative gradient difference per parameter within GRAD_TOL (see parity_utils.gradient_check)."""
    gradient_check(name, data)


# ----- (c) training -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_parity(name, data):
    """50 steps of Adam and LazyAdam through zoo_*.step.TrainStep (see parity_utils.training_check)."""
    training_check(name, data)


# ----- (d) weight round trip ----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weight_roundtrip(name, data):
    roundtrip_check(name, data)


# ----- the same four checks for the VARIANTS ------------------------------------------------------
@pytest.mark.parametrize("check", [forward_check, gradient_check, training_check, roundtrip_check],
                         ids=["forward", "gradient", "training", "roundtrip"])
@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}-{'-'.join(v)}" for n, v in VARIANTS])
def test_variant_parity(check, name, variant, data):
    check(name, data, **variant)
