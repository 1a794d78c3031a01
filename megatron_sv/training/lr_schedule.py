"""The learning-rate / weight-decay schedule and Megatron-LM's rule for resuming it.

A checkpoint carries the schedule it was trained with (``OptimizerParamScheduler.state_dict()`` plus the
WSD settings in the saved args, which megatron-core's scheduler state omits). On resume, Megatron-LM
refuses a schedule that differs from the checkpoint's unless one of two flags says which one wins:

  --override-opt_param-scheduler        the command-line values (the iteration count still comes from
                                        the checkpoint)
  --use-checkpoint-opt_param-scheduler  the checkpoint's values

Without either flag every differing value is named in one error before any tensor is loaded. Silently
continuing with the checkpoint's schedule is what made ``--train-iters 4 --load`` of a ``--train-iters 2``
run train at LR 0.0 without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sv.checkpointing import CheckpointError

OVERRIDE_FLAG = "--override-opt_param-scheduler"
USE_CHECKPOINT_FLAG = "--use-checkpoint-opt_param-scheduler"


@dataclass(frozen=True)
class ScheduleField:
    """One value of the schedule: its key in the scheduler state (or saved args) and the flag that sets it."""

    key: str
    flag: str
    source: str = "scheduler"  # "scheduler": OptimizerParamScheduler.state_dict(); "args": saved args


SCHEDULE_FIELDS = (
    ScheduleField("max_lr", "--lr"),
    ScheduleField("min_lr", "--min-lr"),
    ScheduleField("lr_warmup_steps", "--lr-warmup-iters"),
    ScheduleField("lr_decay_steps", "--lr-decay-iters (default: --train-iters)"),
    ScheduleField("lr_decay_style", "--lr-decay-style"),
    ScheduleField("start_wd", "--weight-decay"),
    ScheduleField("end_wd", "--weight-decay"),
    ScheduleField("wd_incr_style", "(weight-decay increment style)"),
    ScheduleField("lr_wsd_decay_iters", "--lr-wsd-decay-iters", source="args"),
    ScheduleField("lr_wsd_decay_style", "--lr-wsd-decay-style", source="args"),
)


def build_scheduler(optimizer, args):
    """Megatron-Core's OptimizerParamScheduler for the flags in ``args``."""
    # No flag given: schedule_differences has already refused any value that differs, so taking the
    # checkpoint's values is taking ours (megatron-core would otherwise also compare wd_incr_steps, which
    # a constant weight decay never reads and which follows --train-iters).
    use_checkpoint = bool(args.use_checkpoint_opt_param_scheduler) or not args.override_opt_param_scheduler
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=use_checkpoint,
        override_opt_param_scheduler=bool(args.override_opt_param_scheduler),
    )


def _wsd_relevant(sched: Dict[str, Any]) -> bool:
    return sched.get("lr_decay_style") == "wsd"


def schedule_differences(
    scheduler, saved_state: Optional[Dict[str, Any]], saved_args: Dict[str, Any], args
) -> List[str]:
    """'name: checkpoint X, now Y (flag)' for every schedule value that differs from the checkpoint's."""
    if not saved_state:
        return []
    ours_state = scheduler.state_dict()
    ours_args = {"lr_wsd_decay_iters": args.lr_wsd_decay_iters, "lr_wsd_decay_style": args.lr_wsd_decay_style}
    out = []
    for f in SCHEDULE_FIELDS:
        if f.source == "args":
            if not (_wsd_relevant(saved_state) or _wsd_relevant(ours_state)) or f.key not in saved_args:
                continue
            theirs, ours = saved_args[f.key], ours_args[f.key]
        else:
            if f.key not in saved_state:
                continue
            theirs, ours = saved_state[f.key], ours_state[f.key]
        if theirs != ours:
            out.append(f"{f.key}: checkpoint {theirs!r}, now {ours!r} ({f.flag})")
    return out


def check_schedule(scheduler, saved_state, saved_args, args) -> None:
    """Refuse a differing schedule unless a flag says which one wins (raises CheckpointError)."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    diff = schedule_differences(scheduler, saved_state, saved_args, args)
    if diff:
        raise CheckpointError(
            "the learning-rate schedule differs from the checkpoint's: "
            + "; ".join(diff)
            + f". Pass {OVERRIDE_FLAG} to use the command-line values or {USE_CHECKPOINT_FLAG} to use the "
            "checkpoint's"
        )


def adopt_checkpoint_wsd(scheduler, saved_args: Dict[str, Any], args) -> None:
    """With --use-checkpoint-opt_param-scheduler, also take the WSD settings, which megatron-core's
    scheduler state does not carry (they live in the saved args)."""
    if not args.use_checkpoint_opt_param_scheduler:
        return
    if "lr_wsd_decay_iters" in saved_args:
        scheduler.wsd_decay_steps = saved_args["lr_wsd_decay_iters"]
    if "lr_wsd_decay_style" in saved_args:
        scheduler.lr_wsd_decay_style = saved_args["lr_wsd_decay_style"]
