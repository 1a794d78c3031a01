#!/usr/bin/env python3
"""Preprocessing throughput on the stdlib corpus, measured side by side in one run:
  plain   - a single-process loop: tokenize each document in Python, write with IndexedDatasetBuilder
  ours-w1 - megatron_sv.data.preprocess.preprocess, 1 worker
  ours-w2 - the same, 2 workers
megatron.core is imported before timing starts, so every row measures the same work (read jsonl,
tokenize, write .bin/.idx); the CLI's own start-up (mostly importing megatron.core) is not included.

    python benchmarks/bench_preprocess.py [--max-bytes N] [--vocab-size 8000] [--repeats 2]
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy  # noqa: E402

from megatron_sv.data.corpus import write_stdlib_corpus  # noqa: E402
from megatron_sv.data.preprocess import iter_input_texts, preprocess  # noqa: E402
from megatron_sv.data.sentencepiece_training import train_sentencepiece  # noqa: E402
from megatron_sv.data.tokenizers import build_tokenizer  # noqa: E402


def plain_loop(corpus, prefix, tok_args):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = build_tokenizer(**tok_args)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    n = 0
    with open(corpus, "rb") as f:
        for line in f:
            ids = tok.tokenize(json.loads(line)["text"])
            if ids:
                ids.append(tok.eod)
                builder.add_document(numpy.array(ids, dtype=numpy.uint16), [len(ids)])
                n += len(ids)
    builder.finalize(prefix + ".idx")
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2, help="best of N per row")
    args = p.parse_args()

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost kept out of the timings)

    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.jsonl")
        stats = write_stdlib_corpus(corpus, max_bytes=args.max_bytes)
        train_sentencepiece(
            iter_input_texts([corpus]), os.path.join(d, "tok"), vocab_size=args.vocab_size, input_sentence_size=200_000
        )
        tok_args = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": os.path.join(d, "tok.model")}
        print(f"corpus: {stats.num_docs} files, {stats.num_bytes / 1e6:.1f} MB; {os.cpu_count()} CPUs", flush=True)

        def run(name, fn):
            best, tokens = float("inf"), 0
            for r in range(args.repeats):
                prefix = os.path.join(d, f"{name}{r}")
                t = time.perf_counter()
                tokens = fn(prefix)
                best = min(best, time.perf_counter() - t)
            return best, tokens

        devnull = open(os.devnull, "w")
        rows = {
            "plain": run("plain", lambda pre: plain_loop(corpus, pre + "_text_document", tok_args)),
            "ours-w1": run(
                "w1",
                lambda pre: preprocess([corpus], pre, tok_args, workers=1, append_eod=True, log=devnull).total_tokens,
            ),
            "ours-w2": run(
                "w2",
                lambda pre: preprocess([corpus], pre, tok_args, workers=2, append_eod=True, log=devnull).total_tokens,
            ),
        }
        assert len({tokens for _, tokens in rows.values()}) == 1, rows
        base = rows["plain"][0]
        print(f"{'':8} {'seconds':>8} {'Mtokens/s':>10} {'vs plain':>9}")
        for name, (sec, tokens) in rows.items():
            print(f"{name:8} {sec:8.2f} {tokens / sec / 1e6:10.2f} {base / sec:8.2f}x")
        print(f"ours-w2 / ours-w1: {rows['ours-w1'][0] / rows['ours-w2'][0]:.2f}x; tokens: {rows['plain'][1]}")


if __name__ == "__main__":
    main()
