"""The pre-training loop on Megatron-Core's public API.

``run(config)`` (after ``training.cli`` validated the flags): build the tokenizer, initialize distributed
state, then ``Trainer(config, tokenizer).run()``. The Trainer builds the model (our scale-vector specs) in
Megatron's DDP, ``get_megatron_optimizer`` with the method's parameter-group overrides,
``OptimizerParamScheduler`` and the datasets, and delegates each concern of the loop to one unit:

* ``Trainer.train_step``: forward/backward through ``get_forward_backward_func`` (no pipelining, or 1F1B),
  the finiteness checks, the method's hooks, the optimizer and scheduler step;
* ``StepLogger``: per-step records, and every --log-interval steps a line, scalars and vector statistics;
* ``ExitPolicy``: exit signals, --exit-duration-in-mins, --exit-interval, decided alike on every rank;
* ``Checkpointer``: loading with the resume checks, saving (also in the background), when to save.

The method is reached only through ``scale_vectors.training_hooks``.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_sv.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron_sv.checkpointing.dist import SAVE_ERRORS, save_failed
from megatron_sv.checkpointing.model_io import model_differences
from megatron_sv.data.datasets import parse_blend
from megatron_sv.data.verify import check_datasets
from megatron_sv.models.gpt.model import ParallelLayout, build_gpt_model, transformer_config
from megatron_sv.platform import current_device, destroy_distributed, initialize_distributed
from megatron_sv.scale_vectors import training_hooks as sv_hooks
from megatron_sv.training.config import TrainingConfig
from megatron_sv.training.data import MicroBatchSampler, build_datasets, build_tokenizer_from_args, micro_batches
from megatron_sv.training.exits import EXIT_BAD_ARGS, EXIT_DIVERGED, EXIT_OK, report_bad_args
from megatron_sv.training.lr_schedule import adopt_checkpoint_wsd, build_scheduler, check_schedule
from megatron_sv.training.metrics import MetricsWriter, memory_usage, wandb_config_from_args
from megatron_sv.training.signals import ExitSignalHandler


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


class ExitPolicy:
    """When to stop before --train-iters: an exit signal on any rank (training.signals), the time limit
    (--exit-duration-in-mins, rank 0's clock) or --exit-interval. One small all-reduce per step, so every
    rank takes the same decision."""

    def __init__(self, args, handler: Optional[ExitSignalHandler], start_time: float, device, rank: int):
        self.args, self.handler, self.start_time, self.device, self.rank = args, handler, start_time, device, rank

    def _flags(self) -> torch.Tensor:
        flags = torch.zeros(2, dtype=torch.int32, device=self.device)
        if self.handler is not None and self.handler.received:
            flags[0] = self.handler.received  # the signal number: rank 0 names it even when only others got it
        if self.args.exit_duration_in_mins is not None and self.rank == 0:
            flags[1] = int((time.time() - self.start_time) / 60.0 > self.args.exit_duration_in_mins)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    def reason(self, iteration: int) -> Optional[str]:
        """Why training stops after this iteration, or None to go on (collective)."""
        a = self.args
        flags = self._flags()
        if flags[0]:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return f"--exit-duration-in-mins {a.exit_duration_in_mins} reached"
        if a.exit_interval and iteration % a.exit_interval == 0:
            return f"--exit-interval {a.exit_interval} reached"
        return None


class StepLogger:
    """A record of every step (--metrics-file), and every --log-interval steps (and at the last) a line with
    throughput and memory, the TensorBoard/wandb scalars and, unless --no-scale-vector-stats, the vectors'
    statistics."""

    def __init__(self, args, out: MetricsWriter, vector_stats: Optional[Callable[[int], None]]):
        self.args, self.out, self.vector_stats = args, out, vector_stats
        self.tokens_per_step = args.global_batch_size * args.seq_length
        self.window_t, self.window_n = time.time(), 0

    def step(self, iteration: int, consumed_samples: int, loss: float, grad_norm, lr: float, step_ms: float) -> None:
        a = self.args
        self.window_n += 1
        record = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "consumed_samples": consumed_samples}
        self.out.record("train", iteration, dict(record, ms_per_iter=step_ms))
        if iteration % a.log_interval and iteration != a.train_iters:
            return
        dt = time.time() - self.window_t
        ms = 1000 * dt / self.window_n
        tps = self.tokens_per_step * self.window_n / max(dt, 1e-9)
        gn = f"{grad_norm:.4f}" if grad_norm is not None else "n/a"
        self.out.print(
            f" iteration {iteration:8d}/{a.train_iters:8d} | consumed tokens: "
            f"{consumed_samples * a.seq_length:12d} | lr: {lr:.4E} | loss: {loss:.6E} | "
            f"grad norm: {gn} | tokens/s: {tps:10.1f} | ms/iter: {ms:8.1f} | mem: {memory_usage()}"
        )
        self.out.scalars(
            iteration,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": tps,
                "train/ms_per_iter": ms,
            },
        )
        if self.vector_stats is not None:
            self.vector_stats(iteration)
        self.window_t, self.window_n = time.time(), 0


class Checkpointer:
    """--load and --save: the checks a resume passes before anything is loaded, loading, saving (in
    background processes with --async-save), and when a periodic save is due."""

    def __init__(self, config: TrainingConfig, model, optimizer, scheduler, log: Callable[[str], None]):
        self.cfg, self.args = config, config.args
        self.model, self.optimizer, self.scheduler, self.log = model, optimizer, scheduler, log
        self.async_queue = AsyncCallsQueue() if self.args.async_save else None
        self._async_iteration = 0  # the newest background save, named if it fails

    # -- resume checks
    def check_saved_args(self, saved: Dict) -> None:
        a = self.args
        diff = model_differences(saved, self.cfg.saved_args())
        if diff:
            raise CheckpointError("the checkpoint was made for a different model or method: " + "; ".join(diff))
        loads_optimizer = not (a.finetune or a.no_load_optim)
        saved_distopt = saved.get("use_distributed_optimizer")
        if loads_optimizer and saved_distopt is not None and bool(saved_distopt) != a.use_distributed_optimizer:
            raise CheckpointError(
                f"--use-distributed-optimizer: checkpoint {bool(saved_distopt)}, now {a.use_distributed_optimizer}; "
                "the optimizer state does not load across that switch: resume with the checkpoint's setting, or "
                "add --no-load-optim to load the weights only"
            )
        if not a.finetune and saved.get("global_batch_size") not in (None, a.global_batch_size):
            raise CheckpointError(
                f"--global-batch-size {a.global_batch_size} differs from the checkpoint's "
                f"{saved.get('global_batch_size')}; the data order would change (use --finetune to restart)"
            )

    def check_saved_schedule(self, common: Dict) -> None:
        saved_args = common.get("args", {})
        check_schedule(self.scheduler, common.get("opt_param_scheduler"), saved_args, self.args)
        adopt_checkpoint_wsd(self.scheduler, saved_args, self.args)

    # -- load
    def load(self) -> Tuple[int, int]:
        """(iteration, consumed samples) to continue from: (0, 0) without --load, for an empty --load
        directory, and with --finetune."""
        a = self.args
        if not a.load:
            return 0, 0
        weights_only = a.finetune or a.no_load_optim
        state = load_checkpoint(
            a.load,
            [self.model],
            optimizer=None if weights_only else self.optimizer,
            scheduler=None if a.finetune else self.scheduler,
            load_rng=not (a.no_load_rng or a.finetune),
            check_args=self.check_saved_args,
            check_common=None if a.finetune else self.check_saved_schedule,
            log=self.log,
        )
        if state is None:
            self.log(f"no checkpoint in {a.load} yet: starting from scratch")
            return 0, 0
        # the model weights changed under the optimizer's fp32 masters (--bf16): refresh them, then let the
        # method refold the weights from the masters
        if weights_only and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()
        sv_hooks.after_parameters_changed([self.model], self.optimizer)
        if a.finetune:
            self.log("--finetune: iteration, consumed samples and schedule restart at 0")
            return 0, 0
        iteration = int(state["iteration"])
        return iteration, int(state.get("consumed_train_samples", iteration * a.global_batch_size))

    # -- save
    def due(self, iteration: int) -> bool:
        """A periodic save (--save-interval) falls on this iteration."""
        a = self.args
        return bool(a.save and a.save_interval and iteration % a.save_interval == 0)

    def save(self, iteration: int, consumed_samples: int) -> None:
        a = self.args
        if not a.save:
            return
        extra = {"consumed_train_samples": consumed_samples, "args": self.cfg.saved_args()}
        t0 = time.time()
        self._async_iteration = iteration
        if a.overlap_param_gather:  # the last step's all-gather is deferred to the next forward: do it now
            self.model.start_param_sync(force_sync=True)
        save_checkpoint(
            a.save,
            iteration,
            [self.model],
            self.optimizer,
            self.scheduler,
            extra,
            async_queue=self.async_queue,
            log=self.log,
            optimizer_format=a.dist_ckpt_optim_format,
            model_tensors=sv_hooks.checkpoint_tensors([self.model], self.optimizer),
        )
        self.log(
            f"checkpoint save of iteration {iteration} took {time.time() - t0:.2f} s"
            + (" (async; finishing in the background)" if self.async_queue is not None else "")
        )

    def finalize(self, blocking: bool) -> None:
        """Finish background saves whose writing is done on every rank (writes their trackers)."""
        if self.async_queue is None:
            return
        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except SAVE_ERRORS as e:  # a failed background save: one line, the previous checkpoint is kept
            raise save_failed(e, self.args.save, self._async_iteration) from None


class Trainer:
    def __init__(self, config: TrainingConfig, tokenizer, exit_handler: Optional[ExitSignalHandler] = None):
        self.cfg = config
        self.args = config.args  # Megatron-LM's flags, resolved; the model and the method are typed in cfg
        self.tokenizer = tokenizer
        self.device = current_device()
        self.rank = torch.distributed.get_rank()
        a = self.args
        self.out = MetricsWriter(
            self.rank, a.tensorboard_dir, a.metrics_file, wandb_config_from_args(a, config.saved_args())
        )
        self.iteration = 0
        self.consumed_samples = 0
        self.exit_policy = ExitPolicy(a, exit_handler, config.start_time, self.device, self.rank)
        self.checkpointer: Optional[Checkpointer] = None  # once model, optimizer and scheduler exist

    # ------------------------------------------------------------------ setup
    def build_model(self):
        a = self.args
        shape = self.cfg.shape()
        layout = ParallelLayout(
            a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size,
            a.sequence_parallel,
            a.expert_model_parallel_size,
            a.bf16,
        )
        # FP8: Transformer Engine reads its recipe from the config; the local backend's FP8 linears get theirs
        # (cfg.fp8, from validate_args) through the layer spec
        te_fp8 = a.fp8_format and a.transformer_impl == "transformer_engine"
        te_fp8_config = dict(fp8=a.fp8_format, fp8_recipe=a.fp8_recipe) if te_fp8 else {}
        self.config = transformer_config(shape, layout, **te_fp8_config)
        self.config.calculate_per_token_loss = True  # token-weighted loss (see _loss_func); DDP sums grads
        model = self.build_gpt(shape)
        if a.bf16:  # as Megatron-LM: bf16 model weights; fp32 inputs cast in, fp32 outputs on the last stage
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
        self.config.finalize_model_grads_func = sv_hooks.wrap_finalize(finalize_model_grads, [self.model])
        self.config.no_sync_func = self.model.no_sync

    def build_gpt(self, shape):
        """This stage's GPT on our specs, before wrapping (benchmarks put Megatron-Core's own spec here)."""
        cfg = self.cfg
        return build_gpt_model(shape, cfg.sv_config, self.config, transformer_impl=cfg.transformer_impl, fp8=cfg.fp8)

    def build_optimizer(self):
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
            opt_config, [self.model], config_overrides=sv_hooks.optimizer_overrides(self.cfg.sv_config)
        )
        # where each folded linear folds (at the optimizer's master -> model copy under --bf16; fp32 by a
        # cost model); folds the model weights now
        policy = sv_hooks.fold_policy(
            a.sv_fold_once_per_step, a.micro_batch_size * a.seq_length, a.num_microbatches, self.device.type
        )
        sv_hooks.optimizer_ready([self.model], self.optimizer, policy)
        self.scheduler = build_scheduler(self.optimizer, a)

    def report_start(self):
        a = self.args
        self.out.print(
            f"megatron_sv: world {a.world_size} = TP {a.tensor_model_parallel_size} x PP "
            f"{a.pipeline_model_parallel_size} x DP {a.data_parallel_size} (EP {a.expert_model_parallel_size}); "
            f"global batch {a.global_batch_size} = micro-batch {a.micro_batch_size} x {a.num_microbatches} "
            f"micro-batches x DP {a.data_parallel_size}; seq {a.seq_length}; vocab {self.cfg.padded_vocab_size} "
            f"(tokenizer {self.tokenizer.vocab_size}); device {self.device.type}"
        )
        self.out.print(
            f"scale vectors: strategy {a.scale_vector_strategy} ({self.cfg.sv_config.describe()}); "
            f"folded linears: {sv_hooks.describe_folds(self.optimizer)}"
        )
        if self.cfg.fp8 is not None:
            self.out.print(
                f"precision: {self.cfg.fp8.describe()} in every column/row-parallel linear "
                "(torch._scaled_mm); LM head and everything else bf16"
            )
        self.out.print(sv_hooks.describe_parameters(self.cfg.sv_config, [self.model.module], a.weight_decay))

    def build_data(self):
        self.train_ds, self.valid_ds = build_datasets(self.args, self.tokenizer)

    def setup(self):
        """Model, optimizer, checkpoint (if any) and datasets, in the order a resume needs them."""
        self.build_model()
        self.build_optimizer()
        self.report_start()
        self.checkpointer = Checkpointer(self.cfg, self.model, self.optimizer, self.scheduler, self.out.print)
        self.iteration, self.consumed_samples = self.checkpointer.load()
        self.build_data()

    # ------------------------------------------------------------------ steps
    def _forward_step(self, poison_iteration: Optional[int], data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        poison = poison_iteration is not None and poison_iteration == self.iteration + 1
        return output, partial(_loss_func, batch["loss_mask"], poison)

    def _reduce_loss(self, reduced: List[Dict]) -> float:
        """Token-weighted loss of the global batch (sum of masked token losses / loss tokens over all
        micro-batches and data-parallel ranks), known to every rank."""
        contrib = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            contrib += torch.stack([r["lm loss"] for r in reduced]).double().sum(dim=0)
        torch.distributed.all_reduce(contrib)
        return float(contrib[0] / contrib[1])

    def _forward_backward(self, batches: List[dict], poison_iteration: Optional[int], forward_only: bool) -> float:
        a = self.args
        reduced = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, poison_iteration),
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=a.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            forward_only=forward_only,
        )
        return self._reduce_loss(reduced)

    def train_step(self, batches: List[dict]):
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._forward_backward(batches, self.args.inject_nan_at_iteration, forward_only=False)
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

    def _sampler(self, samples: int, consumed: int) -> MicroBatchSampler:
        a = self.args
        return MicroBatchSampler(
            samples, consumed, a.micro_batch_size, a.num_microbatches, ps.get_data_parallel_rank(), a.data_parallel_size
        )

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        a = self.args
        if not a.eval_iters or self.valid_ds is None:
            return None
        self.model.eval()
        it = micro_batches(
            self.valid_ds, self._sampler(a.eval_iters * a.global_batch_size, 0), a.num_workers, self.device
        )
        total = 0.0
        for _ in range(a.eval_iters):
            batches = [next(it) for _ in range(a.num_microbatches)]
            total += self._forward_backward(batches, None, forward_only=True)
        self.model.train()
        loss = total / a.eval_iters
        ppl = math.exp(min(loss, 20.0))
        self.out.print(f"validation at iteration {self.iteration}: loss {loss:.6E} | ppl {ppl:.3f}")
        self.out.record("valid", self.iteration, {"loss": loss})
        self.out.scalars(self.iteration, {"validation/loss": loss, "validation/ppl": ppl})
        return loss

    def log_scale_vectors(self, iteration: int):
        """The method's per-vector statistics on every rank, gathered to rank 0 with global layer numbers."""
        stats = sv_hooks.vector_statistics([self.model.module])
        offset = get_transformer_layer_offset(self.config)
        if offset:
            stats = {
                re.sub(r"^layer(\d+)/", lambda m: f"layer{int(m.group(1)) + offset}/", k): v for k, v in stats.items()
            }
        keep = ps.get_data_parallel_rank() == 0
        gathered = [None] * torch.distributed.get_world_size() if self.rank == 0 else None
        torch.distributed.gather_object(stats if keep else {}, gathered, dst=0)
        if self.rank == 0:
            merged = {}
            for part in gathered:
                merged.update(part)  # TP shards of a vector: rank 0's shard wins (documented as local)
            self.out.scalars(iteration, merged, prefix="scale_vectors/")

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        try:
            self.setup()
            exit_reason = self.train()
            self.finish(exit_reason)
            return EXIT_OK
        finally:
            self.out.close()

    def train(self) -> Optional[str]:
        """Optimizer steps up to --train-iters; returns why training stopped early (None: it did not)."""
        a = self.args
        sampler = self._sampler(a.train_iters * a.global_batch_size, self.consumed_samples)
        data = micro_batches(self.train_ds, sampler, a.num_workers, self.device)
        self.out.print(
            f"training from iteration {self.iteration} to {a.train_iters} "
            f"({a.global_batch_size * a.seq_length} tokens per step)"
        )
        self.model.train()
        logger = StepLogger(a, self.out, None if a.no_scale_vector_stats else self.log_scale_vectors)
        while self.iteration < a.train_iters:
            batches = [next(data) for _ in range(a.num_microbatches)]
            lr = self.scheduler.get_lr(self.optimizer.param_groups[0])  # this step's LR
            t0 = time.time()
            loss, grad_norm = self.train_step(batches)
            step_ms = (time.time() - t0) * 1000
            self.iteration += 1
            self.consumed_samples += a.global_batch_size
            self.checkpointer.finalize(blocking=False)
            logger.step(self.iteration, self.consumed_samples, loss, grad_norm, lr, step_ms)
            if a.eval_iters and self.iteration % a.eval_interval == 0 and self.iteration < a.train_iters:
                self.evaluate()
            exit_reason = self.exit_policy.reason(self.iteration)
            if exit_reason or self.checkpointer.due(self.iteration):
                self.checkpointer.save(self.iteration, self.consumed_samples)
            if exit_reason:
                return exit_reason
        return None

    def finish(self, exit_reason: Optional[str]) -> None:
        """After the last step: the final evaluation and save (an early exit saved already), background
        saves finished, one summary line."""
        a = self.args
        if exit_reason:
            self.out.print(
                f"exiting at iteration {self.iteration}: {exit_reason}"
                + (f"; checkpoint in {a.save}" if a.save else " (no --save: nothing saved)")
            )
        else:
            self.evaluate()
            if not self.checkpointer.due(self.iteration):  # else saved after the step already
                self.checkpointer.save(self.iteration, self.consumed_samples)
        self.checkpointer.finalize(blocking=True)
        self.out.print(
            f"done: iteration {self.iteration}, {time.time() - self.cfg.start_time:.1f} s"
            + (f"; checkpoints in {a.save}" if a.save else "")
            + (f"; TensorBoard logs in {a.tensorboard_dir}" if a.tensorboard_dir else "")
            + (f"; wandb run in {self.out.wandb.dir}" if self.out.wandb is not None else "")
        )


def run(config: TrainingConfig) -> int:
    """Train with the config that ``megatron_sv.training.cli.main`` validated."""
    try:
        tokenizer = build_tokenizer_from_args(config.args)
        config = config.with_vocab(tokenizer.vocab_size)
        if config.data_path:
            check_datasets(parse_blend(config.data_path)[0], tokenizer.vocab_size)  # before any work
    except (ValueError, FileNotFoundError) as e:
        return report_bad_args(e)

    # before the process group's threads and any helper process exist: they inherit the signal block
    handler = ExitSignalHandler().install() if config.exit_signal_handler else None
    initialize_distributed(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        seed=config.seed,
        timeout_minutes=config.distributed_timeout_minutes,
    )
    try:
        return Trainer(config, tokenizer, exit_handler=handler).run()
    except TrainingDivergedError as e:
        if torch.distributed.get_rank() == 0:
            print(
                f"pretrain_gpt_sv.py: training diverged at {e}; stopping without saving "
                f"(the last good checkpoint{' in ' + config.save if config.save else ''} is untouched)",
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
