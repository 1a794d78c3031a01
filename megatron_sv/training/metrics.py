"""Console lines, TensorBoard scalars and a jsonl metrics file, written by global rank 0."""

from __future__ import annotations

import json
import os
import resource
from typing import Dict, Optional

import torch


def memory_usage() -> str:
    if torch.cuda.is_available():
        return f"max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional here
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"RSS {rss:.0f} MiB"


class MetricsWriter:
    def __init__(self, rank: int, tensorboard_dir: Optional[str], metrics_file: Optional[str]):
        self.active = rank == 0
        self.tb = None
        self.jsonl = None
        if not self.active:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.jsonl = open(metrics_file, "a", buffering=1)

    def print(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def record(self, kind: str, iteration: int, values: Dict[str, float]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"type": kind, "iteration": iteration, **values}) + "\n")

    def scalars(self, iteration: int, values: Dict[str, float], prefix: str = "") -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(prefix + k, v, iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
