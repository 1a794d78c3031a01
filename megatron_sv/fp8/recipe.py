"""What an FP8 run quantizes, to which format, with which scale granularity (``--fp8-format/--fp8-recipe``).

Megatron-LM's flag values: ``--fp8-format e4m3`` (every GEMM operand in e4m3) or ``hybrid`` (e4m3 for
activations and weights, e5m2 for gradients, whose range matters more than their precision), and on the
local backend ``--fp8-recipe tensorwise`` (one fp32 scale per tensor) or ``rowwise`` (one fp32 scale per
row of the left operand and per column of the right one). Scales are dynamic: computed from the current
amax of the tensor being cast (no amax history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

FP8_FORMATS = ("e4m3", "hybrid")
LOCAL_FP8_RECIPES = ("tensorwise", "rowwise")
# operand sizes that torch._scaled_mm accepts on CUDA (the contraction dim and the output columns)
FP8_DIM_MULTIPLE = 16
# GPUs with FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
MIN_FP8_CAPABILITY: Tuple[int, int] = (8, 9)


class FP8Unsupported(ValueError):
    """FP8 cannot apply here: a shape, a device or a flag combination; the message says which."""


@dataclass(frozen=True)
class FP8Recipe:
    format: str = "hybrid"  # --fp8-format
    scaling: str = "tensorwise"  # --fp8-recipe

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise FP8Unsupported(f"--fp8-format must be one of {list(FP8_FORMATS)}, got {self.format!r}")
        if self.scaling not in LOCAL_FP8_RECIPES:
            raise FP8Unsupported(
                f"--fp8-recipe on the local backend must be one of {list(LOCAL_FP8_RECIPES)} "
                f"(dynamic scaling from the current amax), got {self.scaling!r}"
            )

    @property
    def forward_dtype(self) -> torch.dtype:
        """Activations and weights."""
        return torch.float8_e4m3fn

    @property
    def grad_dtype(self) -> torch.dtype:
        """Output gradients (the left operand of both backward GEMMs)."""
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"

    def describe(self) -> str:
        grads = "e5m2" if self.format == "hybrid" else "e4m3"
        return f"FP8 {self.format} ({self.scaling} scaling; e4m3 activations/weights, {grads} gradients)"


def check_fp8_capability(capability: Tuple[int, int], device_name: str = "this GPU") -> None:
    """FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper and newer)."""
    if tuple(capability) < MIN_FP8_CAPABILITY:
        raise FP8Unsupported(
            f"FP8 GEMMs need a GPU with compute capability >= {MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} "
            f"(Ada/Hopper or newer); {device_name} has {capability[0]}.{capability[1]}: drop --fp8-format"
        )


def check_fp8_device(device: torch.device) -> None:
    """A clear error on a CUDA device without FP8 support (CPUs run torch._scaled_mm in software)."""
    if device.type == "cuda":
        check_fp8_capability(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


def check_fp8_dims(what: str, **dims: int) -> None:
    """Every GEMM dimension that torch._scaled_mm constrains must be a multiple of 16."""
    bad = {k: v for k, v in dims.items() if v % FP8_DIM_MULTIPLE}
    if bad:
        sizes = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise FP8Unsupported(
            f"FP8 GEMMs need sizes divisible by {FP8_DIM_MULTIPLE}; {what} has {sizes} "
            "(per tensor-parallel rank): change the model shape or drop --fp8-format"
        )


def check_fp8_model_dims(
    *,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    ffn_hidden_size: int,
    gated: bool,
    tp: int,
    moe_ffn_hidden_size: Optional[int] = None,
) -> None:
    """Every FP8 linear of a GPT layer, with its per-TP-rank input and output sizes (the LM head stays bf16)."""
    fc1_out = 2 if gated else 1
    linears = {
        "linear_qkv": (hidden_size, (num_attention_heads + 2 * num_query_groups) * kv_channels // tp),
        "linear_proj": (num_attention_heads * kv_channels // tp, hidden_size),
    }
    if moe_ffn_hidden_size is None:
        linears["linear_fc1"] = (hidden_size, fc1_out * ffn_hidden_size // tp)
        linears["linear_fc2"] = (ffn_hidden_size // tp, hidden_size)
    else:
        linears["expert linear_fc1"] = (hidden_size, fc1_out * moe_ffn_hidden_size // tp)
        linears["expert linear_fc2"] = (moe_ffn_hidden_size // tp, hidden_size)
    for name, (in_f, out_f) in linears.items():
        check_fp8_dims(name, input_features=in_f, output_features=out_f)
