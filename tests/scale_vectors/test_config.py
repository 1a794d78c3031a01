import pytest

from megatron_sv.scale_vectors.config import STRATEGIES, ScaleVectorConfig, strategy_config


def test_presets_match_paper_table():
    assert set(STRATEGIES) == {"none", "standard", "hg", "dp", "dnp", "or", "er", "iwd", "unified"}
    u = STRATEGIES["unified"]
    assert (u.branch_specific, u.placement, u.reparam, u.weight_decay_policy) == (True, "dual_norm", "or", "iwd")
    assert not STRATEGIES["none"].learnable
    assert STRATEGIES["dp"].placement == "dual" and STRATEGIES["dp"].branch_specific
    assert STRATEGIES["er"].reparam == "er" and not STRATEGIES["er"].branch_specific
    assert STRATEGIES["standard"] == ScaleVectorConfig()


def test_overrides_and_errors():
    cfg = strategy_config("unified", reparam="er", weight_decay_policy=None)
    assert cfg.reparam == "er" and cfg.weight_decay_policy == "iwd"
    with pytest.raises(ValueError, match="unknown --scale-vector-strategy"):
        strategy_config("bogus")
    with pytest.raises(ValueError, match="placement must be one of"):
        strategy_config("standard", placement="both")
    with pytest.raises(ValueError, match="strategy 'none'"):
        strategy_config("none", branch_specific=True)
    with pytest.raises(ValueError, match="unknown scale-vector switch"):
        strategy_config("standard", colour="blue")
