"""Device and communication backend selection: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

from typing import Tuple

import torch


def select_backend() -> Tuple[str, str]:
    """Return (distributed backend, device type): ("nccl", "cuda") with a GPU, else ("gloo", "cpu")."""
    if torch.cuda.is_available():
        return "nccl", "cuda"
    return "gloo", "cpu"


def using_cpu() -> bool:
    return select_backend()[1] == "cpu"


def current_device() -> torch.device:
    """The device this rank computes on (its CUDA device, or the CPU)."""
    if using_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
