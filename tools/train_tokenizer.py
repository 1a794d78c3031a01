#!/usr/bin/env python3
"""Train a sentencepiece BPE tokenizer that round-trips code exactly (identity normalization,
byte fallback, newline as its own piece) from jsonl or plain-text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix out/tok --vocab-size 8000
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.data.preprocess import iter_input_texts  # noqa: E402
from megatron_sv.data.sentencepiece_training import train_sentencepiece  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl or plain-text files; globs allowed")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        help="at most this many lines (a seeded sample) are used for training",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        if os.path.exists(args.model_prefix + ".model") and not args.overwrite:
            raise FileExistsError(f"{args.model_prefix}.model exists; pass --overwrite to replace it")
        result = train_sentencepiece(
            iter_input_texts(args.input, args.json_keys),
            args.model_prefix,
            vocab_size=args.vocab_size,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.model_file}: vocab {result.vocab_size}, trained on "
        f"{result.num_lines_used} of {result.num_lines_seen} lines"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
