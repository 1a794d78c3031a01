"""Command line of pretrain_gpt_sv.py: Megatron-LM's flag names plus the scale-vector flags.

``parse_args`` reads the flags (the model's and the method's come from their declarations, GPTShape and
ScaleVectorConfig); ``validate_args`` checks everything that can be checked before any process group,
model or dataset exists (flag combinations, divisibility, files, checkpoint directories) and returns a
``TrainingConfig`` (training/config.py) with the derived values (data-parallel size, micro-batches per
step, ...). Every problem raises ``ArgumentError`` with a message that names the flag.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from megatron_sv.checkpointing.layout import CheckpointError, check_free_space, check_load_dir, check_save_dir
from megatron_sv.config_fields import add_flags, conditional_problems, fill_conditional_defaults, value_problems
from megatron_sv.data.datasets import check_dataset_files, parse_blend, parse_split
from megatron_sv.data.tokenizers import TOKENIZER_TYPES
from megatron_sv.models.gpt.shape import GPTShape, default_ffn_hidden_size, layout_problems, shape_problems
from megatron_sv.platform.parallel_sizes import validate_parallel_sizes
from megatron_sv.scale_vectors.config import STRATEGIES, ScaleVectorConfig, config_from_saved
from megatron_sv.training.config import TrainingConfig
from megatron_sv.training.exits import launch_rank


class ArgumentError(ValueError):
    """A bad flag or flag combination, found before any work was done."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; help texts that explain a derived default in words
    (they contain "default") are left as written, and on/off switches say "off" instead of False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0 and action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage of ~80 flags would bury it; --help shows it), printed by
    rank 0 only: every rank finds the same error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if launch_rank() == 0 else None)


def build_parser() -> argparse.ArgumentParser:
    """The parser alone imports neither torch nor megatron.core (module top), so --help and argument
    errors come back in a fraction of a second and without Transformer Engine/Apex warnings."""
    p = _Parser(
        prog="pretrain_gpt_sv.py",
        description="Pre-train a GPT with scale vectors on Megatron-Core.",
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    # the model's and the method's flags come from their one declaration (GPTShape, ScaleVectorConfig)
    groups = {"model": p.add_argument_group("model"), "scale vectors": p.add_argument_group("scale vectors")}
    groups["scale vectors"].add_argument(
        "--scale-vector-strategy",
        default="standard",
        choices=list(STRATEGIES),
        help="named preset of the method (docs/method.md); --sv-* flags override single switches",
    )
    add_flags(groups, GPTShape)
    # selects whether --num-query-groups counts (saved with the shape; GPTShape: num_query_groups None = MHA)
    groups["model"].add_argument("--group-query-attention", action="store_true", help="grouped-query attention (GQA)")
    add_flags(groups, ScaleVectorConfig)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP degree")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP degree (1F1B schedule)")
    g.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs TP > 1)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="EP degree (MoE)")
    g.add_argument(
        "--use-distributed-optimizer", action="store_true", help="shard optimizer state over data-parallel ranks"
    )
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="reduce gradients bucket by bucket while the backward pass runs",
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="all-gather the distributed optimizer's updated parameters bucket by bucket during "
        "the next forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)",
    )
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0, help="timeout of collective operations")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, required=True, help="samples per rank and micro-batch (required)")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="samples per optimizer step (default: micro-batch-size x data-parallel size, no gradient accumulation)",
    )

    g = p.add_argument_group("optimization")
    g.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "muon"],
        help="AdamW, or Muon (needs the package emerging-optimizers)",
    )
    g.add_argument("--lr", type=float, required=True, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument(
        "--lr-decay-style",
        default="cosine",
        choices=["cosine", "wsd", "linear", "constant"],
        help="learning-rate schedule after warm-up",
    )
    g.add_argument(
        "--lr-wsd-decay-iters",
        type=int,
        default=None,
        help="iterations of the final decay phase of --lr-decay-style wsd (default: none; required with wsd)",
    )
    g.add_argument(
        "--lr-wsd-decay-style",
        default=None,
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
        help="shape of the WSD decay phase (default: exponential)",
    )
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay length (default: --train-iters)")
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps to train (required)")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=0.01,
        help="decoupled weight decay; scale vectors follow --sv-weight-decay-policy",
    )
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (initialization, data order, dropout)")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    g.add_argument(
        "--fp8-format",
        choices=["e4m3", "hybrid"],
        default=None,
        help="FP8 GEMMs in every column/row-parallel linear (needs --bf16): e4m3 everywhere, or "
        "hybrid (e5m2 gradients). --transformer-impl local: torch._scaled_mm (docs/fp8.md); "
        "transformer_engine: TE's FP8 (default: no FP8)",
    )
    g.add_argument(
        "--fp8-recipe",
        choices=["tensorwise", "rowwise", "delayed", "mxfp8", "blockwise"],
        default=None,
        help="FP8 scaling: local backend tensorwise or rowwise (dynamic, from the current amax); "
        "Transformer Engine delayed, tensorwise, mxfp8 or blockwise (default: tensorwise on "
        "local, delayed on transformer_engine)",
    )
    g.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default="local",
        help="local: Megatron-Core local modules (any device); transformer_engine: TE GEMMs "
        "and fused norm+linear for `standard` (CUDA + Transformer Engine)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="indexed-dataset prefixes, or 'weight prefix' pairs (default: none; this or --mock-data)",
    )
    g.add_argument("--split", default="969,30,1", help="train,validation,test shares of --data-path")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens instead of --data-path")
    g.add_argument(
        "--data-cache-path",
        default=None,
        help="where Megatron-Core's dataset index caches go (default: beside the data)",
    )
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    g.add_argument(
        "--tokenizer-type",
        default=None,
        choices=list(TOKENIZER_TYPES),
        help="tokenizer (default: NullTokenizer with --mock-data and --vocab-size, else required)",
    )
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece .model file or Hugging Face tokenizer directory (default: none)",
    )
    g.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocabulary (default: none)")
    g.add_argument("--merge-file", default=None, help="GPT-2 BPE merges (default: none)")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size (default: none)")
    g.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x TP"
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory to write (default: no checkpoints)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (default: start fresh)")
    g.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="save every N iterations (default: only at the end and on exit signals)",
    )
    g.add_argument("--async-save", action="store_true", help="write checkpoints in background processes")
    g.add_argument(
        "--dist-ckpt-optim-format",
        default=None,
        choices=["fully_reshardable", "dp_reshardable"],
        help="distributed-optimizer state: fully_reshardable (loads at any TP/PP/DP layout; "
        "gathers per DP group at save; the default) or dp_reshardable (parallel save, reshards over "
        "DP only)",
    )
    g.add_argument("--no-load-optim", action="store_true", default=None, help="load model weights only (default: off)")
    g.add_argument(
        "--no-load-rng",
        action="store_true",
        default=None,
        help="do not restore the random-number states (default: off)",
    )
    # Megatron-LM's names, underscores included
    g.add_argument(
        "--override-opt_param-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
        default=None,
        help="on resume, use the command-line LR/WD schedule instead of the "
        "checkpoint's (default: off: a differing schedule is refused)",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
        default=None,
        help="on resume, use the checkpoint's LR/WD schedule and "
        "ignore the command-line values (default: off: a differing schedule is refused)",
    )
    g.add_argument(
        "--finetune",
        action="store_true",
        help="load weights only and restart iteration / consumed samples / schedule at 0",
    )
    g.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save and exit after this many minutes (default: no time limit)",
    )
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit at this iteration (default: none)")
    g.add_argument(
        "--exit-signal-handler",
        dest="exit_signal_handler",
        action="store_true",
        default=True,
        help="on SIGTERM/SIGUSR1 save a checkpoint and exit (default: on)",
    )
    g.add_argument(
        "--no-exit-signal-handler",
        dest="exit_signal_handler",
        action="store_false",
        help="turn off --exit-signal-handler",
    )

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="evaluate every N iterations")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (0: none)")
    g.add_argument("--log-interval", type=int, default=100, help="print a training line every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory (default: no TensorBoard)")
    g.add_argument(
        "--metrics-file",
        default=None,
        help="jsonl with one machine-readable record per iteration and evaluation (rank 0; default: none)",
    )
    g.add_argument("--no-scale-vector-stats", action="store_true", help="skip the per-vector TensorBoard statistics")
    g.add_argument(
        "--wandb-project",
        default=None,
        help="log the TensorBoard scalars to this Weights & Biases project too (needs the package "
        "wandb: pip install -e .[wandb]; WANDB_MODE=offline keeps the run local; default: no wandb)",
    )
    g.add_argument("--wandb-exp-name", default=None, help="the wandb run's name (default: wandb chooses one)")
    g.add_argument(
        "--wandb-save-dir",
        default=None,
        help="where wandb writes its files (default: SAVE/wandb with --save, else ./wandb)",
    )
    # test-only: poison the loss at this iteration to exercise the NaN guard
    g.add_argument("--inject-nan-at-iteration", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _fail(msg: str):
    raise ArgumentError(msg)


def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


@dataclass(frozen=True)
class ConditionalFlag:
    """A flag that means something only when ``applies(args)``: given anywhere else it would be silently
    ignored, so it is refused (its parser default is None to tell "given" from "default")."""

    dest: str
    default: object
    needs: str  # what makes the flag apply, for the message
    applies: Callable[[argparse.Namespace], bool]
    flag: str = ""  # the command-line spelling when it is not --dest-with-dashes

    @property
    def name(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")


# Megatron-LM's flags that apply only with another one; the model's and the method's are declared with
# their fields (config_fields.Flag.applies)
CONDITIONAL_FLAGS: Tuple[ConditionalFlag, ...] = (
    ConditionalFlag("lr_wsd_decay_style", "exponential", "--lr-decay-style wsd", lambda a: a.lr_decay_style == "wsd"),
    ConditionalFlag("fp8_recipe", None, "--fp8-format", lambda a: a.fp8_format is not None),  # default: by backend
    ConditionalFlag(
        "dist_ckpt_optim_format",
        "fully_reshardable",
        "--use-distributed-optimizer",
        lambda a: a.use_distributed_optimizer,
    ),
    ConditionalFlag("no_load_optim", False, "--load", lambda a: bool(a.load)),
    ConditionalFlag("no_load_rng", False, "--load", lambda a: bool(a.load)),
    ConditionalFlag(
        "override_opt_param_scheduler",
        False,
        "--load (without --finetune)",
        lambda a: bool(a.load) and not a.finetune,
        flag="--override-opt_param-scheduler",
    ),
    ConditionalFlag(
        "use_checkpoint_opt_param_scheduler",
        False,
        "--load (without --finetune)",
        lambda a: bool(a.load) and not a.finetune,
        flag="--use-checkpoint-opt_param-scheduler",
    ),
    ConditionalFlag(
        "tokenizer_model",
        None,
        "--tokenizer-type SentencePieceTokenizer or HuggingFaceTokenizer",
        lambda a: a.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"),
    ),
    ConditionalFlag(
        "vocab_file", None, "--tokenizer-type GPT2BPETokenizer", lambda a: a.tokenizer_type == "GPT2BPETokenizer"
    ),
    ConditionalFlag(
        "merge_file", None, "--tokenizer-type GPT2BPETokenizer", lambda a: a.tokenizer_type == "GPT2BPETokenizer"
    ),
    ConditionalFlag(
        "vocab_size", None, "--tokenizer-type NullTokenizer", lambda a: a.tokenizer_type in (None, "NullTokenizer")
    ),
)


def check_conditional_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that would be silently ignored; then fill in the defaults of the others."""
    problems = [*conditional_problems(GPTShape, args), *conditional_problems(ScaleVectorConfig, args)]
    problems += [
        f"{flag.name} only applies with {flag.needs}; it would be ignored here"
        for flag in CONDITIONAL_FLAGS
        if getattr(args, flag.dest) is not None and not flag.applies(args)
    ]
    if problems:
        _fail(problems[0])
    fill_conditional_defaults(GPTShape, args)
    for flag in CONDITIONAL_FLAGS:
        if getattr(args, flag.dest) is None:
            setattr(args, flag.dest, flag.default)


# numbers that must be finite (NaN passes every comparison, inf most); the model's are declared with its fields
FINITE_FLOATS = [
    "lr",
    "min_lr",
    "clip_grad",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "exit_duration_in_mins",
    "distributed_timeout_minutes",
]


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> TrainingConfig:
    """Check every flag before any work and return the typed config: the scale-vector config, the FP8 recipe,
    and the resolved flags (a copy of ``args`` with conditional defaults and derived sizes: world_size,
    data_parallel_size, num_microbatches, global_batch_size, lr_decay_iters, ...). Raises ArgumentError
    naming the flag; the checks run in this order, one concern each."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays as parsed
    args.world_size = world_size_from_env() if world_size is None else world_size
    _check_values(args)
    _check_model(args)
    sv_config = _method_config(args)
    shape = _check_parallelism(args)
    _check_batch(args)
    _check_optimization(args)
    fp8 = _check_precision(args, shape)
    _check_data(args)
    _check_tracking(args)
    _check_checkpoints(args)
    return TrainingConfig(args=args, sv_config=sv_config, fp8=fp8)


def _check_values(args: argparse.Namespace) -> None:
    """Flags that would be ignored, flags that exclude each other, numbers out of range."""
    check_conditional_flags(args)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        _fail(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other "
            "(command-line schedule or the checkpoint's); give one"
        )
    if args.sv_fold_once_per_step and args.transformer_impl == "transformer_engine":
        _fail(
            "--sv-fold-once-per-step is not implemented for --transformer-impl transformer_engine (the TE "
            "linears fold per micro-batch); drop one of the two flags"
        )
    positive = [
        "micro_batch_size",
        "train_iters",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "eval_interval",
        "log_interval",
        "make_vocab_size_divisible_by",
    ]
    for message in value_problems(GPTShape, args):
        _fail(message)
    for name in FINITE_FLOATS:
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            _fail(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    for name in positive + ["global_batch_size", "lr_decay_iters", "exit_interval"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            _fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_iters < 0:
        _fail(f"--eval-iters must be >= 0, got {args.eval_iters}")


def _check_model(args: argparse.Namespace) -> None:
    """The shape on its own (the layout's rules come with the parallelism); fills --max-position-embeddings."""
    if args.num_query_groups is not None and not args.group_query_attention:
        _fail("--num-query-groups needs --group-query-attention")
    if args.group_query_attention and not args.num_query_groups:
        _fail("--group-query-attention needs --num-query-groups")
    for message in shape_problems(args.hidden_size, args.num_attention_heads, args.num_query_groups):
        _fail(message)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        _fail(f"--max-position-embeddings {args.max_position_embeddings} < --seq-length {args.seq_length}")
    if args.num_experts is not None and not 1 <= args.moe_router_topk <= args.num_experts:
        _fail(f"--moe-router-topk {args.moe_router_topk} must be in [1, --num-experts {args.num_experts}]")


def _method_config(args: argparse.Namespace) -> ScaleVectorConfig:
    """The strategy's preset with the --sv-* overrides."""
    try:
        return config_from_saved(vars(args))
    except ValueError as e:
        _fail(str(e))


def _check_parallelism(args: argparse.Namespace) -> GPTShape:
    """The layout fits the world and the model; fills data_parallel_size. Returns the shape it checked."""
    tp, pp, ep = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size)
    try:
        args.data_parallel_size = validate_parallel_sizes(args.world_size, tp, pp, ep)
    except ValueError as e:
        _fail(f"{e} (launch with a world size that is a multiple of TP x PP)")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        _fail("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        _fail("--overlap-param-gather needs --overlap-grad-reduce")
    # the padded vocabulary is known once the tokenizer is loaded (TrainingConfig.with_vocab): not checked here
    shape = GPTShape.from_saved(vars(args), vocab_size=0)
    for message in layout_problems(shape, tp, pp, ep, args.sequence_parallel):
        _fail(message)
    return shape


def _check_batch(args: argparse.Namespace) -> None:
    """Fills global_batch_size (no gradient accumulation by default) and num_microbatches."""
    dp = args.data_parallel_size
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        _fail(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} (world {args.world_size} / (TP {tp} x PP {pp}))"
        )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)


def _check_optimization(args: argparse.Namespace) -> None:
    """Optimizer, learning-rate schedule, Adam and clipping; fills lr_decay_iters."""
    if args.optimizer == "muon" and importlib.util.find_spec("emerging_optimizers") is None:  # found, not imported
        _fail(
            "--optimizer muon uses megatron.core.optimizer.muon, which needs the package "
            "'emerging-optimizers' (pip install emerging-optimizers); it is not installed"
        )
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        _fail(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr}) and --lr > 0")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters < 0 or (args.lr_warmup_iters > 0 and args.lr_warmup_iters >= args.lr_decay_iters):
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --lr-decay-iters {args.lr_decay_iters})")
    if args.lr_decay_style == "wsd":
        if args.lr_wsd_decay_iters is None:
            _fail("--lr-decay-style wsd needs --lr-wsd-decay-iters")
        if not 0 < args.lr_wsd_decay_iters <= args.lr_decay_iters - args.lr_warmup_iters:
            _fail(
                f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} must be in (0, --lr-decay-iters - "
                f"--lr-warmup-iters = {args.lr_decay_iters - args.lr_warmup_iters}]"
            )
    elif args.lr_wsd_decay_iters is not None:
        _fail("--lr-wsd-decay-iters only applies to --lr-decay-style wsd")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        _fail("--adam-beta1/--adam-beta2 must be in [0, 1)")
    if args.weight_decay < 0 or args.clip_grad < 0:
        _fail("--weight-decay and --clip-grad must be >= 0")


def _check_precision(args: argparse.Namespace, shape: GPTShape):
    """Backend and FP8; fills the FP8 recipe's default. Returns the local backend's FP8Recipe (or None)."""
    if args.transformer_impl == "transformer_engine":
        # lazy: the probe imports torch, needed only for this backend (the parser stays torch-free)
        from megatron_sv.scale_vectors.te_linears import TransformerEngineUnavailable, require_transformer_engine  # noqa: PLC0415 - see above

        try:
            require_transformer_engine()
        except TransformerEngineUnavailable as e:
            _fail(f"--transformer-impl transformer_engine: {e}")
        if args.num_experts:
            _fail(
                "--transformer-impl transformer_engine does not support MoE (--num-experts) yet; "
                "use --transformer-impl local"
            )
    fp8 = None  # the local backend's FP8Recipe
    if args.fp8_format is not None:
        if not args.bf16:
            _fail("--fp8-format needs --bf16 (FP8 GEMMs with bf16 activations and master weights in fp32)")
        if args.transformer_impl == "transformer_engine":
            args.fp8_recipe = args.fp8_recipe or "delayed"
            if args.fp8_recipe == "rowwise":
                _fail(
                    "--fp8-recipe rowwise is the local backend's (torch._scaled_mm); Transformer Engine "
                    "offers delayed, tensorwise, mxfp8 and blockwise"
                )
        else:
            args.fp8_recipe = args.fp8_recipe or "tensorwise"
            fp8 = _local_fp8_recipe(args, shape)
    return fp8


def _check_data(args: argparse.Namespace) -> None:
    """Data and tokenizer files, the split, evaluation; fills the tokenizer type of mock data."""
    if args.mock_data and args.data_path:
        _fail("give either --mock-data or --data-path, not both")
    if not args.mock_data and not args.data_path:
        _fail(
            "no training data: give --data-path PREFIX (a .bin/.idx pair from tools/preprocess_data.py) or --mock-data"
        )
    if args.tokenizer_type is None:
        if args.mock_data and args.vocab_size:
            args.tokenizer_type = "NullTokenizer"
        else:
            _fail("--tokenizer-type is required")
    need = {
        "SentencePieceTokenizer": ["tokenizer_model"],
        "HuggingFaceTokenizer": ["tokenizer_model"],
        "GPT2BPETokenizer": ["vocab_file", "merge_file"],
        "NullTokenizer": [],
    }[args.tokenizer_type]
    for name in need:
        path = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if not path:
            _fail(f"--tokenizer-type {args.tokenizer_type} needs {flag}")
        if not os.path.exists(path):
            _fail(f"{flag} {path!r} does not exist")
    if args.tokenizer_type == "NullTokenizer" and not args.vocab_size:
        _fail("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.data_path:
        try:
            prefixes, _ = parse_blend(args.data_path)
            check_dataset_files(prefixes)
            parse_split(args.split)
        except (ValueError, FileNotFoundError) as e:
            _fail(f"--data-path/--split: {e}")

    if args.eval_iters > 0 and args.data_path:
        if parse_split(args.split)[1] == 0:
            _fail(
                f"--eval-iters {args.eval_iters} needs a validation share in --split {args.split!r} (or --eval-iters 0)"
            )


def _check_tracking(args: argparse.Namespace) -> None:
    if (args.wandb_exp_name or args.wandb_save_dir) and not args.wandb_project:
        _fail("--wandb-exp-name/--wandb-save-dir need --wandb-project")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:  # found without importing it
        _fail(
            "--wandb-project needs the package 'wandb', which is not installed (pip install wandb, or "
            "pip install -e .[wandb])"
        )


def _check_checkpoints(args: argparse.Namespace) -> None:
    """--save/--load directories (before any work: nothing saved is lost) and the exit conditions."""
    if args.save_interval is not None and args.save_interval <= 0:
        _fail("--save-interval must be positive")
    if args.save_interval and not args.save:
        _fail("--save-interval needs --save")
    if args.async_save and not args.save:
        _fail("--async-save needs --save")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        _fail("--exit-duration-in-mins must be positive")
    if args.finetune and not args.load:
        _fail("--finetune needs --load")
    try:
        if args.load:
            check_load_dir(
                args.load, allow_empty=(args.save is not None and _same_dir(args.load, args.save)), warn=_warn_once
            )
        if args.save:
            check_save_dir(args.save, args.load)
            check_free_space(args.save, _checkpoint_bytes_estimate(args), warn=_warn_once)
    except CheckpointError as e:
        _fail(str(e))


def _local_fp8_recipe(args: argparse.Namespace, shape: GPTShape):
    """--fp8-format on the local backend: recipe, GEMM sizes per TP rank, and an FP8-capable GPU if any."""
    # lazy: torch is needed only when FP8 is asked for (the parser and the other checks stay torch-free)
    import torch  # noqa: PLC0415 - see above

    from megatron_sv.fp8.recipe import FP8Recipe, FP8Unsupported, check_fp8_capability, check_fp8_model_dims  # noqa: PLC0415 - see above

    ffn = shape.resolved_ffn_hidden_size()
    try:
        recipe = FP8Recipe(args.fp8_format, args.fp8_recipe)
        check_fp8_model_dims(
            hidden_size=shape.hidden_size,
            num_attention_heads=shape.num_attention_heads,
            num_query_groups=shape.query_groups,
            kv_channels=shape.hidden_size // shape.num_attention_heads,
            ffn_hidden_size=ffn,
            gated=shape.swiglu,
            tp=args.tensor_model_parallel_size,
            moe_ffn_hidden_size=(shape.moe_ffn_hidden_size or ffn) if shape.num_experts else None,
        )
        if torch.cuda.is_available():
            check_fp8_capability(torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    except FP8Unsupported as e:
        _fail(str(e))
    return recipe


def _warn_once(msg: str) -> None:
    """Validation runs on every rank; warnings are printed by rank 0."""
    if launch_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def _checkpoint_bytes_estimate(args: argparse.Namespace) -> int:
    """A rough checkpoint size for the free-space warning: fp32 weights and two Adam moments (plus the
    bf16 copy), embeddings with the vocabulary if known."""
    h, layers = args.hidden_size, args.num_layers
    ffn = default_ffn_hidden_size(h, args.swiglu, args.ffn_hidden_size)
    mlp = (3 if args.swiglu else 2) * h * ffn * (args.num_experts or 1)
    embeddings = (args.vocab_size or 0) * h * (2 if args.untie_embeddings_and_output_weights else 1)
    params = layers * (4 * h * h + mlp) + embeddings
    return params * (14 if args.bf16 else 12)


def _same_dir(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def args_for_checkpoint(config: TrainingConfig) -> dict:
    """The saved args of a checkpoint: the resolved flags as plain types (TrainingConfig.saved_args)."""
    return config.saved_args()
