"""Make megatron-core's CUDA touch points work on CPU (gloo backend).

Active only when no GPU is used: ``install_cpu_adapter()`` refuses to run when CUDA is
available, so on GPUs nothing in megatron-core is patched. The one exception is not a CPU matter:
megatron-core 0.16.1 forgets to define ``moe_utils.te_general_gemm`` when Transformer Engine is
missing (``NO_TE_PATCHES``, installed only where TE does not import, GPUs included).

Mechanism. Most touch points are module-level calls such as ``torch.cuda.current_device()``,
``torch.zeros(..., device="cuda")`` or ``torch.cuda.synchronize()``. For each megatron-core
module that makes them we replace the module's global name ``torch`` with a ``_CpuTorch``
proxy: attribute access falls through to the real ``torch`` except for ``cuda`` (a CPU shim)
and a few tensor factories that map a CUDA device to the CPU. The real ``torch`` module is
never modified, and no other module sees the proxy.

The remaining touch points get one small patch each, named after the megatron-core function
they serve. Every patch is in ``CPU_PATCHES`` and is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Callable, Dict, List

import torch
from torch.overrides import TorchFunctionMode

_PATCHED_MARK = "_megatron_sv_cpu_patched"


# ---------------------------------------------------------------------------------------------
# The torch proxy given to megatron-core modules that touch CUDA
# ---------------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a CUDA ordinal, e.g. from a saved current_device()
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device_kwargs(kwargs: dict) -> dict:
    if _is_cuda_device(kwargs.get("device")):
        kwargs = dict(kwargs)
        kwargs["device"] = "cpu"
        # pinned memory needs an accelerator; meaningless on a CPU target anyway
        kwargs.pop("pin_memory", None)
    return kwargs


def _factory_on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_cpu_device_kwargs(kwargs))

    return wrapper


class _NullStream:
    """Stand-in for torch.cuda.Stream / Event on CPU: work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


class _CudaOnCpu(types.SimpleNamespace):
    """What ``torch.cuda`` means inside a patched megatron-core module on CPU."""

    def __getattr__(self, name):
        # tensor type objects, amp helpers, nvtx etc.: the real module's attributes
        return getattr(torch.cuda, name)

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def empty_cache():
        pass

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def max_memory_allocated(*args, **kwargs):
        return 0


_CPU_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "as_tensor",
)


class _CpuTorch(types.ModuleType):
    """A ``torch`` look-alike for one megatron-core module: CUDA requests become CPU ones."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _CPU_FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorch()

# megatron-core modules whose module-level ``torch`` is the proxy on CPU (each of them calls
# torch.cuda.current_device(), creates device="cuda" tensors, or uses CUDA streams/events).
CUDA_TOUCHING_MODULES: List[str] = [
    "megatron.core.utils",  # GlobalMemoryBuffer.get_tensor
    "megatron.core.parallel_state",  # synchronize after group creation / timeouts
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
]


def _give_module_cpu_torch(module_name: str) -> Callable[[], None]:
    def patch():
        module = importlib.import_module(module_name)
        if module.__dict__.get("torch") is not CPU_TORCH:
            module.torch = CPU_TORCH

    patch.__name__ = f"cpu_torch_for_{module_name.rsplit('.', 1)[-1]}"
    return patch


# ---------------------------------------------------------------------------------------------
# param.type() == 'torch.cuda.FloatTensor' checks
# ---------------------------------------------------------------------------------------------
class ReportCpuTensorsAsCuda(TorchFunctionMode):
    """Inside this mode ``t.type()`` of a CPU tensor reads 'torch.cuda.<Type>'. Used only around
    the megatron-core functions that assert CUDA parameter types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return func(*args, **kwargs)


def _report_cpu_tensors_as_cuda(fn: Callable) -> Callable:
    if getattr(fn, _PATCHED_MARK, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ReportCpuTensorsAsCuda():
            return fn(*args, **kwargs)

    setattr(wrapper, _PATCHED_MARK, True)
    return wrapper


def patch_clip_grad_by_total_norm_fp32():
    """clip_grads.clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor'."""
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    wrapped = _report_cpu_tensors_as_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    optimizer.clip_grad_by_total_norm_fp32 = wrapped  # imported by name there


def patch_distrib_optimizer_build_model_and_main_param_groups():
    """DistributedOptimizer._build_model_and_main_param_groups and __init__ dispatch on
    param.type() being a 'torch.cuda.*Tensor'."""
    mod = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = mod.DistributedOptimizer
    original = cls.__dict__["_build_model_and_main_param_groups"]
    if not getattr(original.__func__, _PATCHED_MARK, False):
        cls._build_model_and_main_param_groups = classmethod(_report_cpu_tensors_as_cuda(original.__func__))
    cls.__init__ = _report_cpu_tensors_as_cuda(cls.__init__)


def patch_distrib_optimizer_get_parameter_state_dp_zero():
    """DistributedOptimizer.get_parameter_state_dp_zero(use_gloo_comm=False) (the gather behind the
    'fully_reshardable' checkpoint format) moves its send buffer with Tensor.cuda(); on CPU every group
    is gloo anyway, so take the gloo path it already has."""
    mod = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = mod.DistributedOptimizer
    original = cls.get_parameter_state_dp_zero
    if getattr(original, _PATCHED_MARK, False):
        return

    @functools.wraps(original)
    def get_parameter_state_dp_zero(self, use_gloo_comm: bool = True, *args, **kwargs):
        return original(self, True, *args, **kwargs)

    setattr(get_parameter_state_dp_zero, _PATCHED_MARK, True)
    cls.get_parameter_state_dp_zero = get_parameter_state_dp_zero


def patch_float16_optimizer_init():
    """Float16OptimizerWithFloat16Params.__init__ (bf16/fp16 training) checks param.type()."""
    mod = importlib.import_module("megatron.core.optimizer.optimizer")
    cls = mod.Float16OptimizerWithFloat16Params
    cls.__init__ = _report_cpu_tensors_as_cuda(cls.__init__)


# ---------------------------------------------------------------------------------------------
# RNG: a CPU tracker installed as megatron's get_cuda_rng_tracker()
# ---------------------------------------------------------------------------------------------
def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker  # noqa: PLC0415 - megatron.core loads with the patch that needs it

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's tracker with the CPU generator in place of the CUDA one, so that
        ``get_cuda_rng_tracker().fork()`` (dropout, weight init) works on CPU."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


CpuRNGStatesTracker = None  # the class, created on first use (needs megatron-core imported)


def get_cpu_rng_tracker_class():
    global CpuRNGStatesTracker
    if CpuRNGStatesTracker is None:
        CpuRNGStatesTracker = _cpu_rng_tracker_class()
    return CpuRNGStatesTracker


def patch_initialize_rng_tracker():
    """tensor_parallel.random.initialize_rng_tracker builds a CUDA tracker; install ours."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    cls = get_cpu_rng_tracker_class()
    if not isinstance(random._CUDA_RNG_STATE_TRACKER, cls):
        random._CUDA_RNG_STATE_TRACKER = cls()
        random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    original = random.initialize_rng_tracker
    if getattr(original, _PATCHED_MARK, False):
        return

    @functools.wraps(original)
    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not isinstance(random._CUDA_RNG_STATE_TRACKER, cls):
            random._CUDA_RNG_STATE_TRACKER = cls()
        random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    setattr(initialize_rng_tracker, _PATCHED_MARK, True)
    random.initialize_rng_tracker = initialize_rng_tracker


def cpu_model_parallel_manual_seed(seed: int) -> None:
    """CPU counterpart of megatron's model_parallel_cuda_manual_seed: the same three named
    states (data-parallel, model-parallel, expert-parallel) with the same seed offsets."""
    from megatron.core import parallel_state  # noqa: PLC0415 - as above
    from megatron.core.tensor_parallel import random  # noqa: PLC0415 - as above

    patch_initialize_rng_tracker()
    tracker = random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


# ---------------------------------------------------------------------------------------------
# megatron-core 0.16.1 bug, CPU and GPU without Transformer Engine
# ---------------------------------------------------------------------------------------------
def patch_moe_utils_te_general_gemm():
    """moe_utils.router_gemm references te_general_gemm, only defined when TE imports."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if "te_general_gemm" not in moe_utils.__dict__:
        moe_utils.te_general_gemm = None


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------
CPU_PATCHES: Dict[str, Callable[[], None]] = {
    **{f"torch_proxy:{m}": _give_module_cpu_torch(m) for m in CUDA_TOUCHING_MODULES},
    "clip_grads.clip_grad_by_total_norm_fp32": patch_clip_grad_by_total_norm_fp32,
    "distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups": (
        patch_distrib_optimizer_build_model_and_main_param_groups
    ),
    "distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero": (
        patch_distrib_optimizer_get_parameter_state_dp_zero
    ),
    "optimizer.Float16OptimizerWithFloat16Params.__init__": patch_float16_optimizer_init,
    "tensor_parallel.random.initialize_rng_tracker": patch_initialize_rng_tracker,
    "moe_utils.te_general_gemm": patch_moe_utils_te_general_gemm,
}

# Needed wherever Transformer Engine is missing, GPUs included.
NO_TE_PATCHES: Dict[str, Callable[[], None]] = {
    "moe_utils.te_general_gemm": patch_moe_utils_te_general_gemm,
}
# (The distributed optimizer's KeyError('step') on load without TE/Apex is not patched here: our
# checkpoint loader handles it on its own optimizer instances, megatron_sv.checkpointing.dist.)

_installed = False


def cpu_adapter_installed() -> bool:
    return _installed


def install_cpu_adapter(force: bool = False) -> None:
    """Apply every patch in CPU_PATCHES. Idempotent. Refuses when CUDA is available
    (unless ``force``, meant for tests of the adapter itself)."""
    global _installed
    if torch.cuda.is_available() and not force:
        raise RuntimeError("install_cpu_adapter() is for CPU runs; CUDA is available here")
    for patch in CPU_PATCHES.values():
        patch()
    _installed = True


def install_no_te_fixes() -> None:
    """Fixes for megatron-core bugs that show whenever Transformer Engine is not installed."""
    try:
        import transformer_engine  # noqa: F401, PLC0415 - probe

        return
    except ImportError:
        pass
    for patch in NO_TE_PATCHES.values():
        patch()
