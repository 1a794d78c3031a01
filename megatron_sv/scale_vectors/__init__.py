"""The scale-vector method (docs/method.md, docs/scale_vectors.md).

Config and presets, vectors, norms, folded linears, weight-decay groups.
"""

from megatron_sv._lazy import lazy_exports

_EXPORTS = {
    "STRATEGIES": "config",
    "ScaleVectorConfig": "config",
    "strategy_config": "config",
    "ScaleVector": "vector",
    "VectorSpec": "vector",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
