#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron_sv, or re-parameterize a megatron_sv checkpoint.

  export   megatron_sv checkpoint (any TP/PP/EP, any strategy) -> Hugging Face safetensors
           (LlamaForCausalLM / MixtralForCausalLM; a small trust_remote_code model for dnp/unified,
           QK-norm or post-sub-layer norms)
  import   Hugging Face Llama / Mistral / Mixtral safetensors -> megatron_sv checkpoint (any strategy;
           dnp/unified only with --allow-function-change: a warm start, not the same function)
  convert  megatron_sv -> megatron_sv: another strategy (function-preserving except into/out of
           dnp/unified) and/or target TP/PP/EP (vocabulary padding)

Runs in one process (no torchrun): torch_dist checkpoints load at any layout. See docs/conversion.md.

Examples:
  python tools/convert_checkpoint.py export --load ckpts/run1 --save hf/run1
  python tools/convert_checkpoint.py import --hf-dir hf/llama --save ckpts/llama_hg --strategy hg \\
      --target-tensor-parallel-size 2 --seq-length 4096
  python tools/convert_checkpoint.py convert --load ckpts/llama_std --save ckpts/llama_unified \\
      --strategy unified --allow-function-change
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch-free (--help answers at once); the conversions, which import torch, load in main()
from megatron_sv.checkpointing import CheckpointError  # noqa: E402
from megatron_sv.config_fields import add_flags  # noqa: E402
from megatron_sv.scale_vectors.config import STRATEGIES, ScaleVectorConfig, preset_overrides  # noqa: E402


def _sv_flags(p: argparse.ArgumentParser) -> None:
    # the method's switches as the training command line declares them (ScaleVectorConfig's fields)
    p.add_argument(
        "--strategy",
        "--scale-vector-strategy",
        dest="strategy",
        choices=list(STRATEGIES),
        default=None,
        help="target scale-vector strategy",
    )
    add_flags({"scale vectors": p}, ScaleVectorConfig, skip=("fold_once_per_step",))
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    p.add_argument(
        "--allow-function-change",
        action="store_true",
        help="allow conversions that cannot preserve the model's function (into or out of "
        "dnp/unified's inner norms): the result is a warm start",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="megatron_sv -> Hugging Face")
    e.add_argument("--load", required=True, help="megatron_sv checkpoint directory (with the tracker file)")
    e.add_argument("--save", required=True, help="output directory for the Hugging Face model")
    e.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="true vocabulary size (drops padding rows); default: recorded at import, else padded",
    )
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.add_argument("--max-shard-size-mb", type=int, default=2048)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer to write beside the model as Hugging Face files (a sentencepiece .model or a "
        "Hugging Face tokenizer directory); default: the one the checkpoint was trained with",
    )
    e.add_argument("--no-tokenizer", action="store_true", help="export the model without a tokenizer")
    i = sub.add_parser("import", help="Hugging Face -> megatron_sv")
    i.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    i.add_argument("--save", required=True, help="output megatron_sv checkpoint directory")
    i.add_argument("--seq-length", type=int, default=None, help="default: min(max_position_embeddings, 4096)")
    i.add_argument("--overwrite", action="store_true")
    _sv_flags(i)
    c = sub.add_parser("convert", help="megatron_sv -> megatron_sv (strategy and/or target layout)")
    c.add_argument("--load", required=True)
    c.add_argument("--save", required=True)
    c.add_argument("--vocab-size", type=int, default=None, help="true vocabulary size (for re-padding)")
    c.add_argument("--overwrite", action="store_true")
    _sv_flags(c)
    return p


def _overrides(a):
    return preset_overrides(vars(a))


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    # noqa below: torch loads after the arguments are parsed (--help answers at once)
    from megatron_sv.conversion import ConversionError, convert_megatron, export_to_hf, import_from_hf  # noqa: PLC0415

    try:
        if a.command == "export":
            export_to_hf(
                a.load,
                a.save,
                vocab_size=a.vocab_size,
                overwrite=a.overwrite,
                dtype=a.dtype,
                max_shard_bytes=a.max_shard_size_mb << 20,
                tokenizer_model=a.tokenizer_model,
                with_tokenizer=not a.no_tokenizer,
            )
        elif a.command == "import":
            import_from_hf(
                a.hf_dir,
                a.save,
                strategy=a.strategy or "standard",
                sv_overrides=_overrides(a),
                tp=a.target_tensor_parallel_size,
                pp=a.target_pipeline_parallel_size,
                ep=a.target_expert_parallel_size,
                seq_length=a.seq_length,
                make_vocab_size_divisible_by=a.make_vocab_size_divisible_by or 128,
                allow_function_change=a.allow_function_change,
                overwrite=a.overwrite,
            )
        else:
            convert_megatron(
                a.load,
                a.save,
                strategy=a.strategy,
                sv_overrides=_overrides(a),
                tp=a.target_tensor_parallel_size,
                pp=a.target_pipeline_parallel_size,
                ep=a.target_expert_parallel_size,
                make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                vocab_size=a.vocab_size,
                allow_function_change=a.allow_function_change,
                overwrite=a.overwrite,
            )
    except (ConversionError, CheckpointError, ValueError) as err:
        print(f"convert_checkpoint.py {a.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
