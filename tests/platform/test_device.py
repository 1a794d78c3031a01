import pytest
import torch

from megatron_sv.platform import distributed, select_backend, using_cpu


def test_select_backend_matches_hardware():
    expected = ("nccl", "cuda") if torch.cuda.is_available() else ("gloo", "cpu")
    assert select_backend() == expected
    assert using_cpu() == (not torch.cuda.is_available())


def test_read_launch_env_torchrun_and_slurm():
    env = distributed.read_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "h0", 1234)
    env = distributed.read_launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu-node[07-08,10]"}
    )
    assert (env.rank, env.world_size, env.local_rank) == (5, 16, 1)
    assert env.master_addr == "gpu-node07"  # scontrol absent here: parsed from the list
    env = distributed.read_launch_env({})
    assert (env.rank, env.world_size) == (0, 1)


def test_validate_parallel_sizes():
    assert distributed.validate_parallel_sizes(8, 2, 2) == 2
    assert distributed.validate_parallel_sizes(4, 1, 1, expert_model_parallel_size=4) == 4
    with pytest.raises(ValueError, match="not divisible"):
        distributed.validate_parallel_sizes(6, 4, 1)
    with pytest.raises(ValueError, match="expert"):
        distributed.validate_parallel_sizes(4, 2, 1, expert_model_parallel_size=4)
    with pytest.raises(ValueError):
        distributed.validate_parallel_sizes(4, 0, 1)


def test_initialize_distributed_rejects_bad_layout_before_init(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not divisible"):
        distributed.initialize_distributed(tensor_model_parallel_size=4)
    assert not torch.distributed.is_initialized()
