#!/usr/bin/env python3
"""Build the default dataset from the Python standard library: corpus jsonl, an 8k sentencepiece
tokenizer and {output_dir}/stdlib_text_document.bin/.idx. Reuses valid outputs from earlier runs.

    python tools/prepare_default_corpus.py --output-dir data/stdlib [--vocab-size 8000] [--max-bytes 5000000]
"""

import argparse
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # see tools/preprocess_data.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.data.default_corpus import prepare_default_corpus  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-bytes", type=int, default=None, help="limit the corpus to about this many bytes")
    p.add_argument("--input-sentence-size", type=int, default=300_000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    m = prepare_default_corpus(args.output_dir, args.vocab_size, args.max_bytes, args.input_sentence_size, args.workers)
    print(f"data prefix: {m['data_prefix']}\ntokenizer:   {m['tokenizer_model']}\ntokens:      {m['num_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
