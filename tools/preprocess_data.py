#!/usr/bin/env python3
"""Tokenize jsonl or plain-text files into Megatron-Core indexed datasets.

Megatron-LM's flag names; writes {output_prefix}_{key}_document.bin/.idx atomically.

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 2 --append-eod
"""

import argparse
import os
import sys

# Writing .bin/.idx imports megatron.core, which imports torch._inductor; with the default
# compile-thread count that import starts a warm pool of compiler processes (seconds of CPU on
# start and exit). Nothing is compiled here.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.data.preprocess import MalformedInputError, preprocess  # noqa: E402
from megatron_sv.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="jsonl files (.jsonl/.json, one JSON object per line) or plain-text files "
        "(one document per file); globs allowed",
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON object")
    g.add_argument(
        "--on-malformed",
        choices=["fail", "skip"],
        default="fail",
        help="malformed jsonl line: stop with file:line (fail) or skip and count (skip)",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="sentencepiece .model, or local Hugging Face dir/tokenizer.json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument(
        "--allow-empty", action="store_true", help="write a dataset even when no document survives (refused by default)"
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--log-interval", type=int, default=1000, help="progress line every N documents")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    tokenizer_args = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    )
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_args,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            log_interval=args.log_interval,
            on_malformed=args.on_malformed,
            overwrite=args.overwrite,
            allow_empty=args.allow_empty,
        )
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        kind = "malformed input" if isinstance(e, MalformedInputError) else type(e).__name__
        print(f"preprocess_data.py: error ({kind}): {e}", file=sys.stderr)
        return 2
    for key, prefix in stats.output_prefixes.items():
        print(f"wrote {prefix}.bin/.idx: {stats.num_written[key]} documents, {stats.num_tokens[key]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
