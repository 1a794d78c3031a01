import pytest


@pytest.fixture(scope="session")
def single_process():
    """This pytest process as a single megatron rank (what convert_checkpoint.py does)."""
    from megatron_sv.conversion.megatron_model import ensure_single_process

    ensure_single_process()
    yield


@pytest.fixture(scope="module")
def source(single_process, tmp_path_factory):
    """A real megatron_sv checkpoint (a tiny Llama imported with the hg strategy), not to be modified."""
    from megatron_sv.conversion import import_from_hf
    from tests.conversion.helpers import tiny_hf

    tmp = tmp_path_factory.mktemp("source")
    tiny_hf("llama", str(tmp / "hf"), vocab=100)
    root = str(tmp / "ckpt")
    import_from_hf(str(tmp / "hf"), root, strategy="hg", seq_length=16, log=lambda *a, **k: None)
    return root
