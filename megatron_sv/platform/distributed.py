"""Process-group and Megatron-Core model-parallel initialization for torchrun, Slurm or a
single process, on GPUs (NCCL) or CPUs (gloo + the CPU adapter)."""

from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_sv.platform import cpu_adapter
from megatron_sv.platform.cpu_adapter import cpu_model_parallel_manual_seed
from megatron_sv.platform.device import select_backend
from megatron_sv.platform.parallel_sizes import validate_parallel_sizes


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # Fallback for a plain "host" or "prefix[1-4,7]" list without scontrol.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("]")[0].split(",")[0].split("-")[0]
        return prefix + first
    return head


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID); a single process when neither is set."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    port = int(env.get("MASTER_PORT", 29500))
    return LaunchEnv(rank, world, local, addr, port)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    seed: Optional[int] = None,
    timeout_minutes: float = 10.0,
) -> LaunchEnv:
    """Initialize torch.distributed and Megatron-Core's parallel state.

    Reads the rank layout (torchrun or Slurm), validates the parallel sizes before any
    communication, binds the CUDA device (GPU) or installs the CPU adapter (CPU), creates the
    process group and Megatron's model-parallel groups, and seeds the RNG tracker when
    ``seed`` is given.
    """
    launch = read_launch_env()
    validate_parallel_sizes(
        launch.world_size,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        expert_model_parallel_size,
        context_parallel_size,
        expert_tensor_parallel_size,
    )
    backend, device = select_backend()

    cpu_adapter.install_no_te_fixes()
    if device == "cuda":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        cpu_adapter.install_cpu_adapter()

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        if launch.world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process (plain `python pretrain_gpt_sv.py`) needs no agreed port: take a free one so
            # several single-process runs on one machine do not collide on the default 29500.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=int(max(1, timeout_minutes)),
    )
    if seed is not None:
        set_seed(seed)
    return launch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and Megatron's RNG tracker (CUDA tracker on GPU, CPU tracker on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if select_backend()[1] == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_model_parallel_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
