"""Save and load training state with Megatron-Core's dist_checkpointing (torch_dist format).

One checkpoint holds
  model                    ``model.sharded_state_dict()``: layout-independent sharded tensors
  optimizer                ``optimizer.sharded_state_dict(model_sd)``; the distributed optimizer uses the
                           ``fully_sharded_model_space`` format, so its state reshards too
  opt_param_scheduler      OptimizerParamScheduler.state_dict()
  iteration, consumed_train_samples, args (plain types, checked on resume)
plus one small RNG file per rank (``rng/rank_NNNNN.pt``), restored only when the layout is unchanged.

Because sharded tensors are addressed by their global offsets, a checkpoint saved at one TP/PP/DP layout
loads at another. Nothing in a checkpoint may need arbitrary unpickling: before anything reads it,
``load_common`` checks every pickled file with an allowlist (checkpointing.safe_load: a restricted
unpickler for torch's ``.metadata``, ``torch.load(weights_only=True)`` for the rest), since torch's
reader unpickles ``.metadata`` with plain pickle and non-tensor items with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sv.checkpointing.layout import (
    CheckpointError,
    checkpoint_dir,
    read_tracker,
    remove_incomplete_before,
    write_tracker,
)
from megatron_sv.checkpointing.safe_load import verify_checkpoint_files
from megatron_sv.scale_vectors.vector import DROPPED_MAGNITUDE

# Distributed-optimizer state format (megatron-core 0.16.1): "fully_reshardable" gathers the optimizer
# state of each data-parallel group on its DP rank 0 at save time and stores it per model parameter, so
# it loads at any TP/PP/DP layout; "dp_reshardable" saves every rank's buffer shard in parallel (faster,
# no gather) but only reshards across DP. "fully_sharded_model_space" is deprecated in 0.16.1 and fails
# for our parameters ("ShardedTensor.flattened_range is not supported"). The plain (non-distributed)
# optimizer's state is always per parameter and layout-independent.
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
DEFAULT_OPTIMIZER_FORMAT = "fully_reshardable"


def _prime_distributed_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1 without Apex/TE: DistributedOptimizer.sharded_state_dict(is_loading=True)
    calls state_dict(), which asserts one common Adam 'step' over a state that a fresh optimizer does not
    have yet. Create the zero state (what the first step would create) so the load can proceed; the
    checkpoint then overwrites it."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer):
            continue
        inner = sub.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(len(inner.state[p]) for p in params):
            continue
        sub.init_state_fn(inner, sub.config)
        for p in params:
            inner.state[p].setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """megatron-core 0.16.1 without Apex/TE restores the distributed optimizer's torch-Adam ``step`` wrongly:
    load_state_dict gives every parameter the *same* step tensor and then overwrites it with the value of
    the freshly primed (zero) state that was used to build the load request. Adam's bias correction after
    a resume would then restart from step 1. The saved step is in the checkpoint's param groups (the
    common state); give every parameter its own copy of it."""
    groups = _find_key(loaded_optimizer_state, "param_groups") or []
    steps = {g["step"] for g in groups if isinstance(g, dict) and "step" in g}
    if not steps:
        return
    if len(steps) != 1:
        raise CheckpointError(f"inconsistent optimizer steps in the checkpoint: {sorted(steps)}")
    step = float(steps.pop())
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer):
            continue
        for st in sub.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)


def _uses_torch_adam_state(sub) -> bool:
    """True when a DistributedOptimizer's inner optimizer keeps a per-parameter 'step' tensor, as torch's
    Adam/AdamW do (megatron-core falls back to them wherever neither Transformer Engine nor Apex is
    installed, on CPU and GPU alike; TE's and Apex's fused Adam keep the step in the param groups)."""
    return any("step" in st for st in sub.optimizer.state.values())


@contextlib.contextmanager
def _keep_state_keys_missing_from_checkpoint(optimizer):
    """megatron-core 0.16.1 bug, wherever the inner optimizer is torch Adam (no TE/Apex, any device):
    DistributedOptimizer._set_main_param_and_optimizer_states copies every key of the live per-parameter
    state from the checkpoint's tensors, which hold only param/exp_avg/exp_avg_sq, so loading raises
    KeyError('step'). For the duration of our load only, and only on these optimizer instances, keep the
    keys the checkpoint does not carry (the step is restored from the param groups afterwards, see
    _restore_adam_steps). Nothing in megatron-core is patched: the class and other instances are untouched."""
    overridden = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or not _uses_torch_adam_state(sub):
            continue
        original = sub._set_main_param_and_optimizer_states  # the bound class method

        def keep_missing_keys(model_param, tensors, _sub=sub, _original=original):
            current = _sub._get_main_param_and_optimizer_states(model_param)
            kept = {k: v for k, v in current.items() if k not in tensors}
            return _original(model_param, {**kept, **tensors})

        sub._set_main_param_and_optimizer_states = keep_missing_keys  # instance attribute only
        overridden.append(sub)
    try:
        yield
    finally:
        for sub in overridden:
            del sub._set_main_param_and_optimizer_states


def _optimizer_metadata(fmt: str) -> Dict[str, Any]:
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"unknown distributed-optimizer checkpoint format {fmt!r}")
    return {"distrib_optim_sharding_type": fmt}


def _find_key(tree: Any, key: str) -> Optional[Any]:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _unwrap(model_chunks) -> torch.nn.Module:
    if len(model_chunks) != 1:
        raise CheckpointError("virtual pipeline parallelism (several model chunks) is not supported")
    m = model_chunks[0]
    while hasattr(m, "module"):
        m = m.module
    return m


def _rng_state() -> Dict[str, Any]:
    state = {"torch_cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_path(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, "rng", f"rank_{rank:05d}.pt")


def _broadcast_int(value: int) -> int:
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.broadcast(t, 0)
    return int(t.item())


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    extra: Optional[Dict[str, Any]] = None,
    async_queue=None,
    log: Callable[[str], None] = print,
    optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT,
    model_tensors: Optional[Dict[int, torch.Tensor]] = None,
) -> str:
    """Save on every rank (collective). The tracker is written after all ranks finished: at once, or,
    with ``async_queue`` (a dist_checkpointing AsyncCallsQueue), when the async request is finalized.
    ``model_tensors``: {id(model parameter): tensor to store in its place} (a weight that holds a folded
    W_eff is stored as W; the optimizer state is matched to parameters before the swap)."""
    ckpt = checkpoint_dir(root, iteration)
    rank = _rank()
    already = 0
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        try:
            already = int(read_tracker(root) == iteration)
        except CheckpointError:
            already = 0
        if not already and os.path.exists(ckpt):
            shutil.rmtree(ckpt)  # an incomplete earlier attempt: the tracker never named it
        if not already:
            os.makedirs(ckpt)
    if _broadcast_int(already):
        log(f"checkpoint of iteration {iteration} already exists in {root}; not saving it again")
        return ckpt
    _barrier()

    model = _unwrap(model_chunks)
    state: Dict[str, Any] = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], metadata=_optimizer_metadata(optimizer_format)
        )
    if model_tensors:
        _swap_model_tensors(state["model"], model_tensors)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state.update(extra or {})
    strategy = get_default_save_sharded_strategy("torch_dist")
    try:
        request = dist_checkpointing.save(
            state, ckpt, sharded_strategy=strategy, async_sharded_save=async_queue is not None
        )
        # after save(): it warns about non-empty directories
        os.makedirs(os.path.dirname(_rng_path(ckpt, rank)), exist_ok=True)
        torch.save(_rng_state(), _rng_path(ckpt, rank))
    except SAVE_ERRORS as e:  # every rank fails together (dcp gathers the write results)
        raise save_failed(e, root, iteration) from None

    def finalize():
        _barrier()
        if rank == 0:
            write_tracker(root, iteration)
            log(f"saved checkpoint of iteration {iteration} to {ckpt}")
            remove_incomplete_before(root, iteration)

    if async_queue is None:
        finalize()
    else:
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return ckpt


# torch.distributed.checkpoint's CheckpointException (all ranks' write failures) is a BaseException
SAVE_ERRORS = (Exception, CheckpointException)


def _swap_model_tensors(model_state: Dict[str, Any], replacements: Dict[int, torch.Tensor]) -> None:
    swapped = 0
    for sh in model_state.values():  # a factory (e.g. SwiGLU's fc1 split) builds its pieces from .data at save
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and id(sh.data) in replacements:
            new = replacements[id(sh.data)]
            if new.shape != sh.data.shape or new.dtype != sh.data.dtype:
                raise CheckpointError(
                    f"{sh.key}: replacement {tuple(new.shape)} {new.dtype} does not match "
                    f"{tuple(sh.data.shape)} {sh.data.dtype}"
                )
            sh.data = new
            swapped += 1
    if swapped != len(replacements):
        raise CheckpointError(
            f"{len(replacements) - swapped} model tensors to store were not found in the model's sharded state dict"
        )


def _is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        # torch.save's stream writer reports a short write as "unexpected pos N vs M"
        if "No space left on device" in text or "[Errno 28]" in text or "unexpected pos" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save_failed(exc: BaseException, root: str, iteration: int) -> CheckpointError:
    """One line for a failed save (sync, or an async one at finalization). The tracker still names the
    previous checkpoint; the incomplete directory is removed (rank 0), which also frees the space."""
    try:
        previous = read_tracker(root)
    except CheckpointError:
        previous = None
    ckpt = checkpoint_dir(root, iteration)
    if _rank() == 0 and previous != iteration:
        shutil.rmtree(ckpt, ignore_errors=True)
    if _is_disk_full(exc):
        cause = "the disk is full (no space left on device)"
    else:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        cause = f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
    kept = (
        f"the previous checkpoint (iteration {previous}) is kept"
        if previous is not None
        else "no earlier checkpoint exists"
    )
    return CheckpointError(f"saving iteration {iteration} to {ckpt} failed: {cause}; {kept}")


def load_common(root: str, iteration: int) -> Dict[str, Any]:
    """The checkpoint's common state, after every pickled file of it passed the allowlist check
    (checkpointing.safe_load): called before anything else reads the checkpoint."""
    return verify_checkpoint_files(checkpoint_dir(root, iteration))


def load_checkpoint(
    root: str,
    model_chunks: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
    check_args: Optional[Callable[[Dict[str, Any]], None]] = None,
    check_common: Optional[Callable[[Dict[str, Any]], None]] = None,
    log: Callable[[str], None] = print,
) -> Optional[Dict[str, Any]]:
    """Load the tracker's checkpoint into the model (and optimizer / scheduler when given). Returns the
    non-tensor state (iteration, consumed_train_samples, args, ...) or None when ``root`` holds no
    checkpoint. ``check_args(saved_args)`` may raise to refuse an incompatible checkpoint before any
    tensor is read; so may ``check_common(common_state)``."""
    iteration = read_tracker(root) if os.path.isdir(root) else None
    if iteration is None:
        return None
    ckpt = checkpoint_dir(root, iteration)
    common = load_common(root, iteration)
    if check_args is not None:
        check_args(common.get("args", {}))
    if check_common is not None:  # the whole common state (args, scheduler state, ...)
        check_common(common)

    model = _unwrap(model_chunks)
    state: Dict[str, Any] = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        if "optimizer" not in common:
            raise CheckpointError(f"{ckpt} holds no optimizer state; resume with --no-load-optim")
        # load in the format the checkpoint was saved in (a plain optimizer has none)
        fmt = _find_key(common["optimizer"], "param_state_sharding_type") or DEFAULT_OPTIMIZER_FORMAT
        _prime_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=True, metadata=_optimizer_metadata(fmt)
        )
    _report_dropped_magnitudes(ckpt, state["model"], log)
    loaded = dist_checkpointing.load(state, ckpt, sharded_strategy=get_default_load_sharded_strategy(ckpt))
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        # fp32 distributed-optimizer shards are views of the model's leaf params
        with torch.no_grad(), _keep_state_keys_missing_from_checkpoint(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        path = _rng_path(ckpt, _rank())
        saved_args = common.get("args", {})
        same_layout = all(saved_args.get(k) == common_value for k, common_value in _layout().items())
        if same_layout and os.path.isfile(path):
            _set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
        else:
            log(
                "RNG state not restored (parallel layout changed); the model has no dropout by default, "
                "so this only affects runs with dropout"
            )
    out = {k: v for k, v in loaded.items() if k not in ("model", "optimizer")}
    out["iteration"] = iteration
    log(f"loaded checkpoint of iteration {iteration} from {ckpt}")
    return out


def _report_dropped_magnitudes(ckpt: str, model_state: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Migration of checkpoints written before DNP's input-side vectors became direction-only: their
    magnitudes are in the checkpoint but not in the model, and are left out (with their optimizer state)."""
    wanted = {getattr(v, "key", None) for v in _leaves(model_state)}
    saved = dist_checkpointing.load_tensors_metadata(ckpt)
    dropped = sorted(
        k for k in saved if k not in wanted and not k.startswith("optimizer.") and DROPPED_MAGNITUDE.search(k)
    )
    if dropped:
        log(
            f"checkpoint written before direction-only input vectors: dropping {len(dropped)} redundant "
            f"magnitude(s) that the inner norms normalize away ({', '.join(dropped[:4])}"
            f"{', ...' if len(dropped) > 4 else ''})"
        )


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _layout() -> Dict[str, int]:
    return {
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
    }
