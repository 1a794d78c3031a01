"""Console lines, TensorBoard and Weights & Biases scalars and a jsonl metrics file, written by global rank 0."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import psutil
import torch


def memory_usage() -> str:
    if torch.cuda.is_available():
        return f"max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    try:
        rss = psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional here
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"RSS {rss:.0f} MiB"


@dataclass(frozen=True)
class WandbConfig:
    """Megatron-LM's --wandb-* flags: a run in ``project`` named ``name``, its files under ``save_dir``.
    Offline or online is wandb's own setting (``WANDB_MODE=offline``, ``wandb offline``)."""

    project: str
    name: Optional[str] = None
    save_dir: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)  # the run's flags, shown in the wandb UI


def wandb_config_from_args(args, config: Dict[str, Any]) -> Optional[WandbConfig]:
    """None without --wandb-project. The files go to --wandb-save-dir, else SAVE/wandb (as in Megatron-LM),
    else wandb's default (./wandb)."""
    if not args.wandb_project:
        return None
    save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)
    return WandbConfig(args.wandb_project, args.wandb_exp_name, save_dir, config)


class MetricsWriter:
    def __init__(
        self,
        rank: int,
        tensorboard_dir: Optional[str],
        metrics_file: Optional[str],
        wandb_config: Optional[WandbConfig] = None,
    ):
        self.active = rank == 0
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not self.active:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - only with --tensorboard-dir (a slow import)

            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        if wandb_config is not None:
            # optional dependency (extra "wandb"); its presence is checked with the flags
            import wandb  # noqa: PLC0415 - the [wandb] extra, only with --wandb-project

            if wandb_config.save_dir:
                os.makedirs(wandb_config.save_dir, exist_ok=True)
            self.wandb = wandb.init(
                project=wandb_config.project,
                name=wandb_config.name,
                dir=wandb_config.save_dir,
                config=wandb_config.config,
            )
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
        values = {prefix + k: v for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, iteration)
        if self.wandb is not None:
            self.wandb.log(values, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
