"""A few optimizer steps of the baseline GPT with Megatron-Core's DDP, optimizer and pipeline
schedule on fixed synthetic batches; run inside each rank of run_distributed."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import torch

from tests.helpers.grads import full_gradients, gather_reduced_grad_shards

VOCAB = 128
SEQ = 16


def tiny_gpt_shape(moe: bool = False, hidden_size: int = 32, ffn_hidden_size: int = 48):
    """The 2-layer GQA model the parity tests train (4 experts, top-2, with ``moe``)."""
    from megatron_sv.models.gpt.model import GPTShape

    return GPTShape(
        num_layers=2,
        hidden_size=hidden_size,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        seq_length=SEQ,
        ffn_hidden_size=ffn_hidden_size,
        num_experts=4 if moe else None,
        moe_router_topk=2,
    )


def layout_of(parallel: Dict[str, Any], **extra):
    """The ParallelLayout of a test's ``parallel`` dict (keys tp, pp, sp, ep)."""
    from megatron_sv.models.gpt.model import ParallelLayout

    return ParallelLayout(
        tensor_model_parallel_size=parallel.get("tp", 1),
        pipeline_model_parallel_size=parallel.get("pp", 1),
        sequence_parallel=parallel.get("sp", False),
        expert_model_parallel_size=parallel.get("ep", 1),
        **extra,
    )


def synthetic_tokens(global_batch: int, seq_length: int = SEQ, vocab: int = VOCAB, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (global_batch, seq_length + 1), generator=g)


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place


def _forward_step(data_iterator, model):
    device = next(model.parameters()).device
    tokens, labels = (t.to(device) for t in next(data_iterator))
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels, dtype=torch.float))


def _unwrapped(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def full_main_grad(param, optimizer) -> torch.Tensor:
    """The reduced fp32 gradient of ``param`` (under the distributed optimizer each rank holds its owned
    range only: gathered over the data-parallel group)."""
    from megatron_sv.scale_vectors.step_fold import Masters

    shard = Masters(optimizer).shard(param)
    if shard.group is None or torch.distributed.get_world_size(shard.group) == 1:
        return param.main_grad.detach().float().clone()
    full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    full[shard.start : shard.end] = param.main_grad.detach().view(-1)[shard.start : shard.end]
    torch.distributed.all_reduce(full, group=shard.group)
    return full.view_as(param)


def train_steps(
    parallel: Dict[str, int],
    config_overrides: Optional[Dict[str, Any]] = None,
    steps: int = 3,
    micro_batch_size: int = 2,
    num_microbatches: int = 1,
    use_distributed_optimizer: bool = False,
    seed: int = 42,
    collect_grads: Optional[Callable[[str, torch.nn.Parameter], bool]] = None,
    model_hook: Optional[Callable] = None,
    build_model: Optional[Callable[[Dict[str, Any]], Any]] = None,
    finish: Optional[Callable[[torch.nn.Module], Any]] = None,
    optimizer_overrides: Optional[Callable[[], Any]] = None,
    keep_process_group: bool = False,
    save_init_to: Optional[str] = None,
    load_init_from: Optional[str] = None,
    bf16: bool = False,
    tokens: Optional[Callable[[int, int], torch.Tensor]] = None,
    full_grads: bool = False,
    fold_policy: Optional[Any] = None,
    ddp_overrides: Optional[Dict[str, Any]] = None,
    step_hook: Optional[Callable[[int, Any, Any], None]] = None,
) -> Dict[str, Any]:
    """Initialize distributed state with ``parallel`` (tensor/pipeline/expert_model_parallel_size),
    build the baseline model, train ``steps`` steps and return {"losses": [...], "grads": {...}}.

    Each data-parallel rank reads its contiguous block of the same global batch, so layouts
    with equal ``micro_batch_size * num_microbatches * dp`` see identical data. ``grads`` holds
    the main_grad after the first step's finalize_model_grads for parameter names accepted by
    ``collect_grads``. ``save_init_to`` / ``load_init_from``: a torch_dist checkpoint of the
    initial weights (written / read with megatron's dist_checkpointing), to start layouts whose
    initialization differs (e.g. expert parallel) from the same weights. ``bf16``: Megatron's mixed-precision
    optimizer (fp32 master weights; build the model in bf16). ``tokens(global_batch, step)`` replaces the
    random tokens (e.g. a learnable sequence for loss curves).
    ``build_model(parallel) -> (config, model)`` replaces the baseline model (e.g. a scale-vector
    GPT); ``optimizer_overrides()`` gives get_megatron_optimizer's config_overrides; ``finish(model)``
    runs on the unwrapped model after training and its result is returned under "finish".
    ``collect_grads(name, param)`` selects the gradients to return. ``full_grads``: also return, under
    "full_grads", every parameter's reduced gradient after the first step's backward, gathered to its
    global shape under its checkpoint key (tests.helpers.grads), comparable across layouts.
    ``keep_process_group``: tear down
    only Megatron's parallel state afterwards, so one spawned job can run several layouts (re-creating
    the default gloo group in the same process can hang).
    ``bf16``: Megatron's Float16Module and mixed-precision (or distributed) optimizer with fp32 main_grad;
    the model from ``build_model`` must be built with a bf16 config. ``fold_policy``: the scale-vector
    fold policy (step_fold.FoldPolicy). Gradients are collected after the training hooks' chain rule,
    complete also under the distributed optimizer (owned ranges gathered over the DP group).
    ``ddp_overrides``: extra DistributedDataParallelConfig fields (e.g. overlap_grad_reduce).
    ``step_hook(step, model, optimizer)`` runs before each step's forward.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sv.models.gpt.reference_model import build_reference_gpt, reference_config
    from megatron_sv.platform import current_device, destroy_distributed, initialize_distributed

    initialize_distributed(
        tensor_model_parallel_size=parallel.get("tp", 1),
        pipeline_model_parallel_size=parallel.get("pp", 1),
        expert_model_parallel_size=parallel.get("ep", 1),
        seed=seed,
    )
    try:
        if build_model is not None:
            config, model = build_model(parallel)
        else:
            config = reference_config(
                tensor_model_parallel_size=parallel.get("tp", 1),
                pipeline_model_parallel_size=parallel.get("pp", 1),
                expert_model_parallel_size=parallel.get("ep", 1),
                **(config_overrides or {}),
            )
            model = build_reference_gpt(config, vocab_size=VOCAB, max_sequence_length=SEQ)
        model.to(current_device())  # weights are created on the CPU (use_cpu_initialization)
        if save_init_to is not None:
            os.makedirs(save_init_to, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), save_init_to)
        if load_init_from is not None:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), load_init_from))
        if model_hook is not None:
            model_hook(model)
        if bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            **{
                "grad_reduce_in_fp32": True,
                "overlap_grad_reduce": False,
                "use_distributed_optimizer": use_distributed_optimizer,
                **(ddp_overrides or {}),
            }
        )
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        from megatron_sv.scale_vectors.training_hooks import after_parameters_changed, wrap_finalize

        config.finalize_model_grads_func = wrap_finalize(finalize_model_grads, [model])
        config.no_sync_func = model.no_sync
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            min_lr=1e-2,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=1.0,
            bf16=bf16,
            fp16=False,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(
            opt_config, [model], config_overrides=optimizer_overrides() if optimizer_overrides is not None else None
        )
        for group in optimizer.param_groups:
            group["lr"] = opt_config.lr
        from megatron_sv.scale_vectors import training_hooks
        from megatron_sv.scale_vectors.step_fold import FoldPolicy

        training_hooks.optimizer_ready(
            [model],
            optimizer,
            fold_policy
            or FoldPolicy(tokens_per_micro_batch=micro_batch_size * SEQ, micro_batches_per_step=num_microbatches),
        )

        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        per_rank = micro_batch_size * num_microbatches
        forward_backward = get_forward_backward_func()
        losses: List[float] = []
        grads: Dict[str, torch.Tensor] = {}
        grad_norms: List[float] = []
        for step in range(steps):
            data = (
                synthetic_tokens(per_rank * dp_size, seed=1000 + step)
                if tokens is None
                else tokens(per_rank * dp_size, step)
            )
            mine = data[dp_rank * per_rank : (dp_rank + 1) * per_rank]
            batches = [
                (mine[i : i + micro_batch_size, :-1].contiguous(), mine[i : i + micro_batch_size, 1:].contiguous())
                for i in range(0, per_rank, micro_batch_size)
            ]
            if step_hook is not None:
                step_hook(step, model, optimizer)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            reduced = forward_backward(
                forward_step_func=_forward_step,
                data_iterator=iter(batches),
                model=[model],
                num_microbatches=num_microbatches,
                seq_length=SEQ,
                micro_batch_size=micro_batch_size,
                forward_only=False,
            )
            training_hooks.before_optimizer_step([model], optimizer)
            if step == 0 and collect_grads is not None:
                for name, p in _unwrapped(model).named_parameters():
                    if collect_grads(name, p):
                        grads[name] = full_main_grad(p, optimizer).cpu().clone()
            if step == 0 and full_grads:
                if use_distributed_optimizer:
                    gather_reduced_grad_shards(model)
                full = full_gradients(_unwrapped(model))
            ok, grad_norm, _ = optimizer.step()
            assert ok, "optimizer step was skipped"
            after_parameters_changed([model], optimizer)  # as the training loop does (parameter caches)
            grad_norms.append(float(grad_norm))
            # mean of the micro-batch losses on the last stage, averaged over data-parallel ranks
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                local = torch.stack([r["lm loss"] for r in reduced]).mean()
                contrib = torch.tensor([local.item(), 1.0], dtype=torch.float64, device=current_device())
            else:
                contrib = torch.zeros(2, dtype=torch.float64, device=current_device())
            if parallel_state.get_tensor_model_parallel_rank() != 0:
                contrib.zero_()
            torch.distributed.all_reduce(contrib)
            losses.append(float(contrib[0] / contrib[1]))
        result = {"losses": losses, "grads": grads, "grad_norm": float(grad_norm), "grad_norms": grad_norms}
        if full_grads:
            result["full_grads"] = full
        if finish is not None:
            result["finish"] = finish(_unwrapped(model))
        return result
    finally:
        if keep_process_group:
            parallel_state.destroy_model_parallel()
        else:
            destroy_distributed()
