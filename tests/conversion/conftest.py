import pytest


@pytest.fixture(scope="session")
def single_process():
    """This pytest process as a single megatron rank (what convert_checkpoint.py does)."""
    from megatron_sv.conversion.megatron_model import ensure_single_process

    ensure_single_process()
    yield
