#!/usr/bin/env python3
"""Build the default dataset from the Python standard library's .py files: corpus jsonl, a sentencepiece
tokenizer and {output_dir}/stdlib_text_document.bin/.idx (megatron_sv.data.default_corpus). Reuses valid
outputs of earlier runs.

    python tools/prepare_default_corpus.py --output-dir runs/data/stdlib [--vocab-size 8000] [--max-bytes N]

Progress goes to stderr; stdout gets exactly three lines for scripts: DATA_PATH=<prefix for --data-path>,
TOKENIZER_MODEL=<.model for --tokenizer-model> and NUM_TOKENS=<n> (examples/pretrain_gpt_sv.sh reads them).
"""

import argparse
import inspect
import os
import sys

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # see tools/preprocess_data.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sv.data.default_corpus import prepare_default_corpus  # noqa: E402

_DEFAULTS = {k: p.default for k, p in inspect.signature(prepare_default_corpus).parameters.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=_DEFAULTS["vocab_size"], help="default: %(default)s")
    p.add_argument(
        "--max-bytes", type=int, default=None, help="limit the corpus to about this many bytes (default: all files)"
    )
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=_DEFAULTS["input_sentence_size"],
        help="lines sampled to train the tokenizer (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=_DEFAULTS["workers"], help="default: %(default)s")
    args = p.parse_args(argv)
    m = prepare_default_corpus(args.output_dir, args.vocab_size, args.max_bytes, args.input_sentence_size, args.workers)
    print(f"DATA_PATH={m['data_prefix']}\nTOKENIZER_MODEL={m['tokenizer_model']}\nNUM_TOKENS={m['num_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
