#!/usr/bin/env python3
"""Prepare the embedded default training data: the Python standard library's .py files (present on
every machine with Python), a sentencepiece BPE tokenizer trained on them, and the Megatron indexed
dataset. Uses megatron_sv.data (corpus, sentencepiece training, preprocessing). Idempotent: finished
outputs are reused.

    python examples/prepare_default_corpus.py --out-dir data/stdlib --vocab-size 8000
prints the --data-path prefix and the tokenizer model on its last two lines (PREFIX=..., TOKENIZER=...).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.data.corpus import write_stdlib_corpus  # noqa: E402
from megatron_sv.data.indexed import is_valid_indexed_dataset  # noqa: E402
from megatron_sv.data.preprocess import iter_input_texts, output_prefix_for, preprocess  # noqa: E402
from megatron_sv.data.sentencepiece_training import train_sentencepiece  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--tokenizer-lines", type=int, default=200_000,
                   help="lines sampled to train the tokenizer")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    corpus = os.path.join(args.out_dir, "stdlib.jsonl")
    tok_prefix = os.path.join(args.out_dir, f"spm{args.vocab_size}")
    out_prefix = os.path.join(args.out_dir, "stdlib")
    data_prefix = output_prefix_for(out_prefix, "text")
    t0 = time.time()
    if not os.path.isfile(corpus):
        stats = write_stdlib_corpus(corpus, max_bytes=args.max_bytes)
        print(f"corpus: {stats.num_docs} files, {stats.num_bytes / 1e6:.1f} MB -> {corpus} "
              f"({time.time() - t0:.1f} s)", flush=True)
    if not os.path.isfile(tok_prefix + ".model"):
        t = time.time()
        res = train_sentencepiece(iter_input_texts([corpus]), tok_prefix, vocab_size=args.vocab_size,
                                  input_sentence_size=args.tokenizer_lines)
        print(f"tokenizer: {res.vocab_size} pieces from {res.num_lines_used} of {res.num_lines_seen} lines "
              f"-> {res.model_file} ({time.time() - t:.1f} s)", flush=True)
    if not is_valid_indexed_dataset(data_prefix):
        t = time.time()
        stats = preprocess([corpus], out_prefix,
                           dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_prefix + ".model"),
                           workers=args.workers, append_eod=True, log_interval=10**9, overwrite=True)
        print(f"dataset: {stats.total_tokens} tokens -> {data_prefix}.bin/.idx ({time.time() - t:.1f} s)",
              flush=True)
    print(f"PREFIX={data_prefix}")
    print(f"TOKENIZER={tok_prefix}.model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
