"""The pre-training loop on Megatron-Core's public API.

``main(argv)``: parse and validate flags (before any work), build the tokenizer, initialize
distributed state, then ``Trainer(args, tokenizer).run()``: model (our scale-vector specs) in
Megatron's DDP, ``get_megatron_optimizer`` with the scale-vector param-group overrides,
``OptimizerParamScheduler``, datasets from megatron.core.datasets, the schedule from
``get_forward_backward_func`` (no pipelining, or 1F1B), checkpoints, signals, evaluation and logging.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import time
from functools import partial
from typing import Dict, List, Optional

import torch

from megatron_sv.checkpointing.model_io import model_differences
from megatron_sv.scale_vectors import training_hooks as sv_hooks
from megatron_sv.training.arguments import args_for_checkpoint, padded_vocab_size
from megatron_sv.training.cli import EXIT_BAD_ARGS, EXIT_DIVERGED, EXIT_OK, report_bad_args
from megatron_sv.training.lr_schedule import adopt_checkpoint_wsd, build_scheduler, check_schedule


class TrainingDivergedError(RuntimeError):
    """A non-finite loss or gradient norm; the last good checkpoint is left untouched."""


class _NanGradient(torch.autograd.Function):
    """Test hook (--inject-nan-at-iteration): the loss stays finite and its gradient is NaN, as when a
    backward pass overflows; only the gradient check before the optimizer step can see it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _loss_func(loss_mask: torch.Tensor, poison: bool, output_tensor: torch.Tensor):
    """Megatron's token-weighted loss: (sum of masked token losses, number of loss tokens, report).

    With ``calculate_per_token_loss`` the schedule adds up the sums and the token counts over all
    micro-batches, and finalize_model_grads divides the gradients by the token count of the whole global
    batch (all micro-batches, all data-parallel ranks): the step minimizes sum(losses) / tokens, not a
    mean of per-micro-batch means, which differs as soon as loss masks are uneven."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(output_tensor.float().view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    if poison:
        loss_sum = _NanGradient.apply(loss_sum)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def gradients_are_finite(ddp_model, device) -> bool:
    """True when every reduced gradient on every rank is finite (one pass over the gradient buffers and
    one all-reduce). Runs after the data-parallel reduction, before the optimizer reads anything; a NaN
    in any rank's local gradient reaches the reduced shard of some rank, so the verdict is global."""
    buffers = list(getattr(ddp_model, "buffers", [])) + list(getattr(ddp_model, "expert_parallel_buffers", []))
    # A buffer's sum is finite iff all its elements are (short of an fp32 overflow, far beyond sane gradients).
    sums = [b.grad_data.sum(dtype=torch.float32) for b in buffers]
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    if sums:
        bad = (~torch.isfinite(torch.stack(sums))).any().float().view(1)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


class Trainer:
    def __init__(self, args, tokenizer, exit_handler=None):
        from megatron.core import parallel_state as ps

        from megatron_sv.platform import current_device

        self.args = args
        self.tokenizer = tokenizer
        self.device = current_device()
        self.rank = torch.distributed.get_rank()
        self.ps = ps
        self.start_time = getattr(args, "_start_time", time.time())
        from megatron_sv.training.metrics import MetricsWriter, wandb_config_from_args

        self.out = MetricsWriter(
            self.rank, args.tensorboard_dir, args.metrics_file, wandb_config_from_args(args, args_for_checkpoint(args))
        )
        self.iteration = 0
        self.consumed_samples = 0
        self.async_queue = None
        self._async_iteration = 0
        self.exit_handler = exit_handler  # training.signals.ExitSignalHandler, installed by main()

    # ------------------------------------------------------------------ setup
    def build_model(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from megatron_sv.models.gpt.model import GPTShape, ParallelLayout, transformer_config

        a = self.args
        shape = GPTShape(
            num_layers=a.num_layers,
            hidden_size=a.hidden_size,
            num_attention_heads=a.num_attention_heads,
            vocab_size=a.padded_vocab_size,
            seq_length=a.seq_length,
            ffn_hidden_size=a.ffn_hidden_size,
            num_query_groups=a.num_query_groups if a.group_query_attention else None,
            max_position_embeddings=a.max_position_embeddings,
            normalization=a.normalization,
            norm_epsilon=a.norm_epsilon,
            swiglu=a.swiglu,
            position_embedding_type=a.position_embedding_type,
            rotary_base=a.rotary_base,
            untie_embeddings_and_output_weights=a.untie_embeddings_and_output_weights,
            qk_layernorm=a.qk_layernorm,
            post_sublayer_norm=a.sv_post_sublayer_norm,
            init_method_std=a.init_method_std,
            num_experts=a.num_experts,
            moe_router_topk=a.moe_router_topk,
            moe_ffn_hidden_size=a.moe_ffn_hidden_size,
            moe_token_dispatcher_type=a.moe_token_dispatcher_type,
            moe_aux_loss_coeff=a.moe_aux_loss_coeff,
        )
        layout = ParallelLayout(
            a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size,
            a.sequence_parallel,
            a.expert_model_parallel_size,
            a.bf16,
        )
        # FP8: Transformer Engine reads its recipe from the config; the local backend's FP8 linears get theirs
        # (a.fp8, set by validate_args) through the layer spec
        te_fp8 = a.fp8_format and a.transformer_impl == "transformer_engine"
        te_fp8_config = dict(fp8=a.fp8_format, fp8_recipe=a.fp8_recipe) if te_fp8 else {}
        self.config = transformer_config(shape, layout, **te_fp8_config)
        self.config.calculate_per_token_loss = True  # token-weighted loss (see _loss_func); DDP sums grads
        model = self.build_gpt(shape)
        if a.bf16:  # as Megatron-LM: bf16 model weights; fp32 inputs cast in, fp32 outputs on the last stage
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(self.config, model)
        model.to(self.device)
        # grad_reduce_in_fp32: main_grad accumulates and reduces in fp32 (--accumulate-allreduce-grads-in-fp32)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather,
            use_distributed_optimizer=a.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=model)
        from megatron_sv.scale_vectors.training_hooks import wrap_finalize

        self.config.finalize_model_grads_func = wrap_finalize(finalize_model_grads, [self.model])
        self.config.no_sync_func = self.model.no_sync

    def build_gpt(self, shape):
        """This stage's GPT on our specs, before wrapping (benchmarks put Megatron-Core's own spec here)."""
        from megatron_sv.models.gpt.model import build_gpt_model

        a = self.args
        return build_gpt_model(
            shape, a.sv_config, self.config, transformer_impl=a.transformer_impl, fp8=getattr(a, "fp8", None)
        )

    def build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_sv.scale_vectors.param_groups import scale_vector_config_overrides

        a = self.args
        opt_config = OptimizerConfig(
            optimizer=a.optimizer,
            lr=a.lr,
            min_lr=a.min_lr,
            weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2,
            adam_eps=a.adam_eps,
            clip_grad=a.clip_grad,
            bf16=a.bf16,
            fp16=False,
            params_dtype=torch.bfloat16 if a.bf16 else torch.float32,
            use_distributed_optimizer=a.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(
            opt_config, [self.model], config_overrides=scale_vector_config_overrides(a.sv_config)
        )
        # where each folded linear folds (at the optimizer's master -> model copy under --bf16; fp32 by a
        # cost model); folds the model weights now
        folder = sv_hooks.optimizer_ready([self.model], self.optimizer, self._fold_policy())
        self.fold_plans = folder.plans()
        self.scheduler = build_scheduler(self.optimizer, a)

    def _fold_policy(self):
        from megatron_sv.scale_vectors.step_fold import FOLD_COST_PER_TOKEN, FoldPolicy

        a = self.args
        return FoldPolicy(
            mode="step" if a.sv_fold_once_per_step else "auto",
            tokens_per_micro_batch=a.micro_batch_size * a.seq_length,
            micro_batches_per_step=a.num_microbatches,
            fold_cost_per_token=FOLD_COST_PER_TOKEN.get(self.device.type, FOLD_COST_PER_TOKEN["cuda"]),
        )

    def report_start(self):
        from megatron_sv.scale_vectors.param_groups import format_param_group_table, param_group_table
        from megatron_sv.scale_vectors.stats import parameter_report

        a = self.args
        module = self.model.module
        self.out.print(
            f"megatron_sv: world {a.world_size} = TP {a.tensor_model_parallel_size} x PP "
            f"{a.pipeline_model_parallel_size} x DP {a.data_parallel_size} (EP {a.expert_model_parallel_size}); "
            f"global batch {a.global_batch_size} = micro-batch {a.micro_batch_size} x {a.num_microbatches} "
            f"micro-batches x DP {a.data_parallel_size}; seq {a.seq_length}; vocab {a.padded_vocab_size} "
            f"(tokenizer {self.tokenizer.vocab_size}); device {self.device.type}"
        )
        self.out.print(
            f"scale vectors: strategy {a.scale_vector_strategy} ({a.sv_config.describe()}); "
            f"folded linears: {_describe_plans(self.fold_plans)}"
        )
        if getattr(a, "fp8", None) is not None:
            self.out.print(
                f"precision: {a.fp8.describe()} in every column/row-parallel linear "
                "(torch._scaled_mm); LM head and everything else bf16"
            )
        rows = param_group_table(a.sv_config, [module], a.weight_decay)
        self.out.print("parameter groups (rank 0's shard):\n" + format_param_group_table(rows))
        self.out.print(str(parameter_report([module])) + " (rank 0's shard)")

    def build_data(self):
        from megatron_sv.training.data import build_datasets

        self.train_ds, self.valid_ds = build_datasets(self.args, self.tokenizer)

    # ------------------------------------------------------------------ checkpoints
    def _check_saved_args(self, saved: Dict) -> None:
        from megatron_sv.checkpointing import CheckpointError

        diff = model_differences(saved, args_for_checkpoint(self.args))
        if diff:
            raise CheckpointError("the checkpoint was made for a different model or method: " + "; ".join(diff))
        a = self.args
        loads_optimizer = not (a.finetune or a.no_load_optim)
        saved_distopt = saved.get("use_distributed_optimizer")
        if loads_optimizer and saved_distopt is not None and bool(saved_distopt) != a.use_distributed_optimizer:
            raise CheckpointError(
                f"--use-distributed-optimizer: checkpoint {bool(saved_distopt)}, now {a.use_distributed_optimizer}; "
                "the optimizer state does not load across that switch: resume with the checkpoint's setting, or "
                "add --no-load-optim to load the weights only"
            )
        if not self.args.finetune and saved.get("global_batch_size") not in (None, self.args.global_batch_size):
            raise CheckpointError(
                f"--global-batch-size {self.args.global_batch_size} differs from the checkpoint's "
                f"{saved.get('global_batch_size')}; the data order would change (use --finetune to restart)"
            )

    def _check_saved_schedule(self, common: Dict) -> None:
        saved_args = common.get("args", {})
        check_schedule(self.scheduler, common.get("opt_param_scheduler"), saved_args, self.args)
        adopt_checkpoint_wsd(self.scheduler, saved_args, self.args)

    def maybe_load(self):
        from megatron_sv.checkpointing import load_checkpoint

        a = self.args
        if not a.load:
            return
        weights_only = a.finetune or a.no_load_optim
        state = load_checkpoint(
            a.load,
            [self.model],
            optimizer=None if weights_only else self.optimizer,
            scheduler=None if a.finetune else self.scheduler,
            load_rng=not (a.no_load_rng or a.finetune),
            check_args=self._check_saved_args,
            check_common=None if a.finetune else self._check_saved_schedule,
            log=self.out.print,
        )
        if state is None:
            self.out.print(f"no checkpoint in {a.load} yet: starting from scratch")
            return
        # the model weights changed under the optimizer's fp32 masters (--bf16): refresh them, then let the
        # method refold the weights from the masters
        if weights_only and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()
        sv_hooks.after_parameters_changed([self.model], self.optimizer)
        if a.finetune:
            self.out.print("--finetune: iteration, consumed samples and schedule restart at 0")
            return
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state.get("consumed_train_samples", self.iteration * a.global_batch_size))

    def save(self):
        from megatron_sv.checkpointing import save_checkpoint

        a = self.args
        extra = {"consumed_train_samples": self.consumed_samples, "args": args_for_checkpoint(a)}
        t0 = time.time()
        self._async_iteration = self.iteration  # the newest background save, named if it fails
        if a.overlap_param_gather:  # the last step's all-gather is deferred to the next forward: do it now
            self.model.start_param_sync(force_sync=True)
        save_checkpoint(
            a.save,
            self.iteration,
            [self.model],
            self.optimizer,
            self.scheduler,
            extra,
            async_queue=self.async_queue,
            log=self.out.print,
            optimizer_format=a.dist_ckpt_optim_format,
            model_tensors=sv_hooks.checkpoint_tensors([self.model], self.optimizer),
        )
        self.out.print(
            f"checkpoint save of iteration {self.iteration} took {time.time() - t0:.2f} s"
            + (" (async; finishing in the background)" if self.async_queue is not None else "")
        )

    # ------------------------------------------------------------------ steps
    def _forward_step(self, poison_iteration: Optional[int], data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        poison = poison_iteration is not None and poison_iteration == self.iteration + 1
        return output, partial(_loss_func, batch["loss_mask"], poison)

    def _reduce_loss(self, reduced: List[Dict]) -> float:
        """Token-weighted loss of the global batch (sum of masked token losses / loss tokens over all
        micro-batches and data-parallel ranks), known to every rank."""
        ps = self.ps
        contrib = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            contrib += torch.stack([r["lm loss"] for r in reduced]).double().sum(dim=0)
        torch.distributed.all_reduce(contrib)
        return float(contrib[0] / contrib[1])

    def train_step(self, batches: List[dict]):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        a = self.args
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, a.inject_nan_at_iteration),
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=a.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            forward_only=False,
        )
        loss = self._reduce_loss(reduced)
        # Both checks run before the optimizer step: a diverged step applies nothing.
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"iteration {self.iteration + 1}: the loss is {loss}")
        if not gradients_are_finite(self.model, self.device):
            raise TrainingDivergedError(
                f"iteration {self.iteration + 1}: non-finite (NaN/Inf) gradients before "
                f"the optimizer step (loss {loss:.6E}); no update was applied"
            )
        sv_hooks.before_optimizer_step([self.model], self.optimizer)
        ok, grad_norm, _ = self.optimizer.step()
        sv_hooks.after_parameters_changed([self.model], self.optimizer)
        if not ok:
            self.out.print(f"iteration {self.iteration + 1}: optimizer step skipped")
        self.scheduler.step(increment=1)
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_sv.training.data import MicroBatchSampler, micro_batches

        a = self.args
        if not a.eval_iters or self.valid_ds is None:
            return None
        self.model.eval()
        sampler = MicroBatchSampler(
            a.eval_iters * a.global_batch_size,
            0,
            a.micro_batch_size,
            a.num_microbatches,
            self.ps.get_data_parallel_rank(),
            a.data_parallel_size,
        )
        it = micro_batches(self.valid_ds, sampler, a.num_workers, self.device)
        total = 0.0
        for _ in range(a.eval_iters):
            batches = [next(it) for _ in range(a.num_microbatches)]
            reduced = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, None),
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=a.num_microbatches,
                seq_length=a.seq_length,
                micro_batch_size=a.micro_batch_size,
                forward_only=True,
            )
            total += self._reduce_loss(reduced)
        self.model.train()
        loss = total / a.eval_iters
        ppl = math.exp(min(loss, 20.0))
        self.out.print(f"validation at iteration {self.iteration}: loss {loss:.6E} | ppl {ppl:.3f}")
        self.out.record("valid", self.iteration, {"loss": loss})
        self.out.scalars(self.iteration, {"validation/loss": loss, "validation/ppl": ppl})
        return loss

    def log_scale_vectors(self):
        """scale_vector_statistics on every rank, gathered to rank 0 with global layer numbers."""
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from megatron_sv.scale_vectors.stats import scale_vector_statistics

        stats = scale_vector_statistics([self.model.module])
        offset = get_transformer_layer_offset(self.config)
        if offset:
            stats = {
                re.sub(r"^layer(\d+)/", lambda m: f"layer{int(m.group(1)) + offset}/", k): v for k, v in stats.items()
            }
        keep = self.ps.get_data_parallel_rank() == 0
        gathered = [None] * torch.distributed.get_world_size() if self.rank == 0 else None
        torch.distributed.gather_object(stats if keep else {}, gathered, dst=0)
        if self.rank == 0:
            merged = {}
            for part in gathered:
                merged.update(part)  # TP shards of a vector: rank 0's shard wins (documented as local)
            self.out.scalars(self.iteration, merged, prefix="scale_vectors/")

    # ------------------------------------------------------------------ loop
    def _exit_flags(self) -> torch.Tensor:
        a = self.args
        handler = self.exit_handler
        flags = torch.zeros(2, dtype=torch.int32, device=self.device)
        if handler is not None and handler.received:
            flags[0] = handler.received  # the signal number: rank 0 names it even when only others got it
        if a.exit_duration_in_mins is not None and self.rank == 0:
            flags[1] = int((time.time() - self.start_time) / 60.0 > a.exit_duration_in_mins)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    def run(self) -> int:
        from megatron_sv.training.data import MicroBatchSampler, micro_batches

        a = self.args
        try:
            self.build_model()
            self.build_optimizer()
            self.report_start()
            if a.async_save:
                self._setup_async()
            self.maybe_load()
            self.build_data()
            sampler = MicroBatchSampler(
                a.train_iters * a.global_batch_size,
                self.consumed_samples,
                a.micro_batch_size,
                a.num_microbatches,
                self.ps.get_data_parallel_rank(),
                a.data_parallel_size,
            )
            data = micro_batches(self.train_ds, sampler, a.num_workers, self.device)
            tokens_per_step = a.global_batch_size * a.seq_length
            self.out.print(
                f"training from iteration {self.iteration} to {a.train_iters} ({tokens_per_step} tokens per step)"
            )
            self.model.train()
            window_t, window_n = time.time(), 0
            exit_reason = None
            while self.iteration < a.train_iters:
                batches = [next(data) for _ in range(a.num_microbatches)]
                lr = self.scheduler.get_lr(self.optimizer.param_groups[0])  # this step's LR
                t0 = time.time()
                loss, grad_norm = self.train_step(batches)
                step_ms = (time.time() - t0) * 1000
                self.iteration += 1
                self.consumed_samples += a.global_batch_size
                window_n += 1
                self.out.record(
                    "train",
                    self.iteration,
                    {
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": lr,
                        "consumed_samples": self.consumed_samples,
                        "ms_per_iter": step_ms,
                    },
                )
                if self.async_queue is not None:
                    self.finalize_async_saves(blocking=False)
                if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                    dt = time.time() - window_t
                    ms = 1000 * dt / window_n
                    tps = tokens_per_step * window_n / max(dt, 1e-9)
                    gn = f"{grad_norm:.4f}" if grad_norm is not None else "n/a"
                    self.out.print(
                        f" iteration {self.iteration:8d}/{a.train_iters:8d} | consumed tokens: "
                        f"{self.consumed_samples * a.seq_length:12d} | lr: {lr:.4E} | loss: {loss:.6E} | "
                        f"grad norm: {gn} | tokens/s: {tps:10.1f} | ms/iter: {ms:8.1f} | "
                        f"mem: {_memory()}"
                    )
                    self.out.scalars(
                        self.iteration,
                        {
                            "train/loss": loss,
                            "train/lr": lr,
                            "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tps,
                            "train/ms_per_iter": ms,
                        },
                    )
                    if not a.no_scale_vector_stats and self.out is not None:
                        self.log_scale_vectors()
                    window_t, window_n = time.time(), 0
                if a.eval_iters and self.iteration % a.eval_interval == 0 and self.iteration < a.train_iters:
                    self.evaluate()
                flags = self._exit_flags()
                if flags[0]:
                    exit_reason = f"received {signal.Signals(int(flags[0])).name}"
                elif flags[1]:
                    exit_reason = f"--exit-duration-in-mins {a.exit_duration_in_mins} reached"
                elif a.exit_interval and self.iteration % a.exit_interval == 0:
                    exit_reason = f"--exit-interval {a.exit_interval} reached"
                if a.save and (exit_reason or (a.save_interval and self.iteration % a.save_interval == 0)):
                    self.save()
                if exit_reason:
                    self.out.print(
                        f"exiting at iteration {self.iteration}: {exit_reason}"
                        + (f"; checkpoint in {a.save}" if a.save else " (no --save: nothing saved)")
                    )
                    break
            else:
                self.evaluate()
                if a.save and not (a.save_interval and self.iteration % a.save_interval == 0):
                    self.save()
            if self.async_queue is not None:
                self.finalize_async_saves(blocking=True)
            self.out.print(
                f"done: iteration {self.iteration}, {time.time() - self.start_time:.1f} s"
                + (f"; checkpoints in {a.save}" if a.save else "")
                + (f"; TensorBoard logs in {a.tensorboard_dir}" if a.tensorboard_dir else "")
                + (f"; wandb run in {self.out.wandb.dir}" if self.out.wandb is not None else "")
            )
            return EXIT_OK
        finally:
            self.out.close()

    def finalize_async_saves(self, blocking: bool) -> None:
        """Finish background saves whose writing is done on every rank (writes their trackers)."""
        from megatron_sv.checkpointing.dist import SAVE_ERRORS, save_failed

        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except SAVE_ERRORS as e:  # a failed background save: one line, the previous checkpoint is kept
            raise save_failed(e, self.args.save, self._async_iteration) from None

    def _setup_async(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.async_queue = AsyncCallsQueue()


_PLAN_NAMES = {
    "master": "folded at the master->model copy once per step",
    "cached": "cached fold once per step",
    "micro_batch": "folded per micro-batch",
}


def _describe_plans(plans) -> str:
    return ", ".join(f"{n} {_PLAN_NAMES[k]}" for k, n in sorted(plans.items())) or "none"


def _memory() -> str:
    from megatron_sv.training.metrics import memory_usage

    return memory_usage()


def run(args) -> int:
    """Train with flags that ``megatron_sv.training.cli.main`` parsed and validated."""
    try:
        from megatron_sv.training.data import build_tokenizer_from_args

        tokenizer = build_tokenizer_from_args(args)
        args.padded_vocab_size = padded_vocab_size(
            tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        if args.data_path:
            from megatron_sv.data.datasets import parse_blend
            from megatron_sv.data.verify import check_datasets

            check_datasets(parse_blend(args.data_path)[0], tokenizer.vocab_size)  # before any work
    except (ValueError, FileNotFoundError) as e:
        return report_bad_args(e)

    from megatron_sv.checkpointing import CheckpointError
    from megatron_sv.platform import destroy_distributed, initialize_distributed
    from megatron_sv.training.signals import ExitSignalHandler

    # before the process group's threads and any helper process exist: they inherit the signal block
    handler = ExitSignalHandler().install() if args.exit_signal_handler else None
    initialize_distributed(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    try:
        return Trainer(args, tokenizer, exit_handler=handler).run()
    except TrainingDivergedError as e:
        if torch.distributed.get_rank() == 0:
            print(
                f"pretrain_gpt_sv.py: training diverged at {e}; stopping without saving "
                f"(the last good checkpoint{' in ' + args.save if args.save else ''} is untouched)",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_DIVERGED
    except CheckpointError as e:
        print(f"pretrain_gpt_sv.py: checkpoint error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_ARGS
    finally:
        destroy_distributed()
        if handler is not None:
            handler.restore()
