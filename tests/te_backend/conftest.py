import os

import pytest
import torch

from tests.helpers.distributed import find_free_port


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (skipped where CUDA is not available)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron-Core parallel state on one in-process rank (gloo on CPU, NCCL on a GPU)."""
    from megatron_sv.platform import destroy_distributed, initialize_distributed

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    initialize_distributed(seed=1234)
    yield
    destroy_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
