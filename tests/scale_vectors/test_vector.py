import math

import pytest
import torch

from megatron_sv.scale_vectors.vector import ScaleVector, VectorSpec


@pytest.mark.parametrize("reparam", ["none", "or", "er"])
def test_vectors_are_exactly_one_at_init_and_consume_no_randomness(reparam):
    before = torch.get_rng_state()
    v = ScaleVector(VectorSpec(size=37, role="input", reparam=reparam))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(v(), torch.ones(37))


def test_or_formula_and_magnitude_gets_large_effective_lr():
    v = ScaleVector(VectorSpec(size=4, role="input", reparam="or"))
    with torch.no_grad():
        v.magnitude.fill_(2.0)
        v.direction.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    alpha = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(v(), 2.0 * math.sqrt(4) * alpha / alpha.norm())


def test_er_formula():
    v = ScaleVector(VectorSpec(size=3, role="output", reparam="er"))
    with torch.no_grad():
        v.log_magnitude.fill_(0.5)
        v.log_direction.copy_(torch.tensor([0.1, -0.2, 0.3]))
    a = torch.tensor([0.1, -0.2, 0.3]).exp()
    torch.testing.assert_close(v(), math.exp(0.5) * math.sqrt(3) * a / a.norm())


@pytest.mark.parametrize("reparam", ["none", "or", "er"])
def test_set_value_round_trips(reparam):
    v = ScaleVector(VectorSpec(size=6, role="input", reparam=reparam))
    target = torch.tensor([0.5, 1.5, 2.0, 0.25, 1.0, 3.0])
    v.set_value(target)
    torch.testing.assert_close(v(), target)


def test_er_rejects_non_positive_values():
    v = ScaleVector(VectorSpec(size=2, role="input", reparam="er"))
    with pytest.raises(ValueError, match="positive"):
        v.set_value(torch.tensor([1.0, -1.0]))


def test_params_declare_role():
    v = ScaleVector(VectorSpec(size=2, role="output", reparam="or"))
    assert {p.sv_role for p in v.parameters()} == {"output"}


@pytest.mark.parametrize("reparam", ["or", "er"])
def test_direction_only_vector_has_no_magnitude(reparam):
    """Before an inner norm a vector's magnitude is redundant: not a parameter, fixed at 1."""
    v = ScaleVector(VectorSpec(size=4, role="input", reparam=reparam, direction_only=True))
    assert [n for n, _ in v.named_parameters()] == ["direction" if reparam == "or" else "log_direction"]
    assert torch.equal(v(), torch.ones(4)) and v.magnitude_value() == 1.0
    target = torch.tensor([0.5, 1.5, 2.0, 0.25])
    v.set_value(target)  # keeps the direction; the magnitude (the RMS) is dropped
    torch.testing.assert_close(v(), target / target.square().mean().sqrt())
