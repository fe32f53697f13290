"""Bad numbers in, clear errors out: NaN-proof verification and checked inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.errors import BadInputError, VerificationError
from oba_fx.verify import compare


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(n=2):
    return [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(n)]


def test_a_nan_output_of_the_reference_alone_fails_verification():
    good, bad = _mlp(), _mlp()
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    with pytest.raises(VerificationError, match="NaN/Inf"):
        compare(good, bad, (torch.randn(5, 4),))


def test_nan_at_the_same_places_is_compared_on_the_finite_values():
    a, b = _mlp(), _mlp()
    with torch.no_grad():
        for m in (a, b):
            m[2].bias[1] = float("nan")
        b[2].bias[0] += 1.0
    x = torch.randn(5, 4)
    with pytest.raises(VerificationError, match="differs from the masked original"):
        compare(a, b, (x,))
    assert compare(a, copy.deepcopy(a), (x,)) == 0.0


def test_non_finite_weights_are_refused_naming_the_parameter():
    m = _mlp()
    with torch.no_grad():
        m[0].weight[1, 2] = float("nan")
    with pytest.raises(BadInputError, match=r"parameter '0.weight' has 1 non-finite"):
        oba_fx.prune_graph(m, torch.randn(2, 4), channel_ratio=0.5)
    assert issubclass(BadInputError, ValueError)


def test_an_empty_example_batch_is_refused():
    with pytest.raises(BadInputError, match="example_inputs has an empty batch"):
        oba_fx.prune_graph(_mlp(), torch.randn(0, 4), target_flops=0.5)


def test_a_nan_calibration_batch_is_refused_naming_the_batch():
    data = _data(3)
    data[1][0][2, 1] = float("inf")
    with pytest.raises(BadInputError, match="calibration batch 1 has 1 non-finite"):
        oba_fx.prune_graph(_mlp(), torch.randn(1, 4), criterion="taylor", data=data, channel_ratio=0.5,
                           verbose=False)


def test_a_nan_loss_is_refused_naming_the_criterion_and_batch():
    def nan_loss(z, y):
        return torch.nn.functional.cross_entropy(z, y) * float("nan")

    with pytest.raises(BadInputError, match="criterion 'oba' on calibration batch 0 gave .* non-finite scores"):
        oba_fx.score(_mlp(), _data(), criterion="oba", loss_fn=nan_loss, progress=False)
