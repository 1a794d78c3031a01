"""The scale-vector method (PAPER.md): config and presets, vectors, norms, folded linears, WD groups."""

from .config import STRATEGIES, ScaleVectorConfig, strategy_config
from .vector import ScaleVector, VectorSpec

__all__ = ["STRATEGIES", "ScaleVectorConfig", "strategy_config", "ScaleVector", "VectorSpec"]
