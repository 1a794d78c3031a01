"""Each CPU-adapter patch, checked against the megatron-core code it serves."""

import importlib

import pytest
import torch

from megatron_sv.platform import cpu_adapter
from megatron_sv.platform.cpu_adapter import CPU_PATCHES, CPU_TORCH, CUDA_TOUCHING_MODULES

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU adapter is for CPU runs")


@pytest.fixture(scope="module", autouse=True)
def installed():
    cpu_adapter.install_cpu_adapter()
    cpu_adapter.install_cpu_adapter()  # idempotent


def test_registry_lists_every_proxied_module_and_each_patch_is_idempotent():
    for name in CUDA_TOUCHING_MODULES:
        assert f"torch_proxy:{name}" in CPU_PATCHES
    for name, patch in CPU_PATCHES.items():
        patch()
        patch()


@pytest.mark.parametrize("module_name", CUDA_TOUCHING_MODULES)
def test_torch_proxy_installed(module_name):
    module = importlib.import_module(module_name)
    assert module.torch is CPU_TORCH
    # the real torch is not modified
    assert torch.cuda is not CPU_TORCH.cuda
    assert torch.zeros is not CPU_TORCH.zeros


def test_proxy_maps_cuda_requests_to_cpu():
    cuda = CPU_TORCH.cuda
    assert cuda.current_device() == "cpu"
    assert cuda.is_available() is False
    cuda.synchronize()
    with cuda.stream(cuda.Stream()):
        cuda.current_stream().wait_stream(cuda.default_stream())
    ev = cuda.Event(enable_timing=True)
    ev.record()
    for device in ("cuda", torch.device("cuda"), 0, cuda.current_device()):
        t = CPU_TORCH.zeros(3, device=device)
        assert t.device.type == "cpu"
    t = CPU_TORCH.tensor([1, 2], device="cuda", pin_memory=True)
    assert t.device.type == "cpu" and t.tolist() == [1, 2]
    assert CPU_TORCH.empty_like(t, device="cuda").device.type == "cpu"
    assert CPU_TORCH.arange(4, device="cuda").tolist() == [0, 1, 2, 3]
    # everything else is the real torch
    assert CPU_TORCH.Tensor is torch.Tensor and CPU_TORCH.float32 is torch.float32
    assert CPU_TORCH.cuda.FloatTensor is torch.cuda.FloatTensor


def test_megatron_global_memory_buffer_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((4, 2), torch.float32, "mpu")
    assert buf.shape == (4, 2) and buf.device.type == "cpu"


def test_megatron_causal_mask_helper_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())


def test_report_cpu_tensors_as_cuda_mode_is_scoped():
    p = torch.nn.Parameter(torch.zeros(2))
    with cpu_adapter.ReportCpuTensorsAsCuda():
        assert p.type() == "torch.cuda.FloatTensor"
        assert p.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert p.type(torch.float64).dtype == torch.float64  # conversions untouched
    assert p.type() == "torch.FloatTensor"


def test_clip_grad_by_total_norm_fp32_on_cpu():
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_distrib_optimizer_methods_wrapped():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    mark = cpu_adapter._PATCHED_MARK
    assert getattr(DistributedOptimizer._build_model_and_main_param_groups.__func__, mark)
    assert getattr(DistributedOptimizer.__init__, mark)
    assert getattr(Float16OptimizerWithFloat16Params.__init__, mark)


def test_cpu_rng_tracker_fork_is_reproducible_and_restores_state():
    from megatron.core.tensor_parallel import random

    random.initialize_rng_tracker(force_reset=True)
    tracker = random.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_adapter.get_cpu_rng_tracker_class())
    tracker.add("a", 11)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("a"):
        x1 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # outer stream untouched
    with tracker.fork("a"):
        x2 = torch.rand(3)
    assert not torch.equal(x1, x2)  # the forked stream advanced
    torch.manual_seed(11)
    expected = torch.rand(6)
    torch.testing.assert_close(torch.cat([x1, x2]), expected, rtol=0, atol=0)
    with pytest.raises(Exception):
        tracker.add("b", 11)  # duplicate seed
    random.initialize_rng_tracker(force_reset=True)


def test_moe_router_gemm_without_transformer_engine():
    from megatron.core.transformer.moe import moe_utils

    assert "te_general_gemm" in moe_utils.__dict__
    inp = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    out = moe_utils.RouterGatingLinearFunction.apply(inp, weight, None, torch.float32)
    torch.testing.assert_close(out, inp @ weight.t())
    out.sum().backward()
    torch.testing.assert_close(inp.grad, weight.sum(0).expand(3, 4))


def test_adapter_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError):
        cpu_adapter.install_cpu_adapter()
