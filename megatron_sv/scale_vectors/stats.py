"""What the scale vectors cost and what they learned: parameter share and per-branch statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable

import torch

from .vector import ScaleVector


@dataclass(frozen=True)
class ParameterReport:
    scale_vector_params: int
    total_params: int

    @property
    def share(self) -> float:
        return self.scale_vector_params / max(1, self.total_params)

    def __str__(self) -> str:
        return (
            f"scale-vector parameters: {self.scale_vector_params:,} of {self.total_params:,} "
            f"({self.share:.3e} of the model)"
        )


def parameter_report(model_chunks: Iterable[torch.nn.Module]) -> ParameterReport:
    """Counts of this rank's parameters (local shards; sum over ranks for the global count)."""
    sv = total = 0
    for chunk in model_chunks:
        for p in chunk.parameters():
            total += p.numel()
            if getattr(p, "sv_role", None) is not None:
                sv += p.numel()
    return ParameterReport(sv, total)


def _short(name: str) -> str:
    # decoder.layers.3.self_attention.linear_qkv.input_scales.q -> layer3/attn/qkv/in/q
    name = name.replace("module.", "").replace("decoder.layers.", "layer").replace("decoder.", "")
    for old, new in (
        ("self_attention.", "attn."),
        ("input_scales.", "in."),
        ("output_scales.", "out."),
        ("linear_", ""),
        ("final_layernorm", "final_norm"),
        ("experts.local_experts.", "expert"),
        (".scale", ""),
    ):
        name = name.replace(old, new)
    return name.replace(".", "/")


@torch.no_grad()
def scale_vector_statistics(model_chunks: Iterable[torch.nn.Module]) -> Dict[str, float]:
    """Per vector (layer and branch): mean/min/max of s and its magnitude (OR/ER beta, else RMS).

    Local values (TP-sharded vectors report their shard; the magnitude is global); cheap enough to log
    every --log-interval.
    """
    out: Dict[str, float] = {}
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, ScaleVector):
                s = module().detach().float()
                key = _short(name)
                out[f"{key}/mean"] = float(s.mean())
                out[f"{key}/min"] = float(s.min())
                out[f"{key}/max"] = float(s.max())
                out[f"{key}/magnitude"] = module.magnitude_value()
    return out
