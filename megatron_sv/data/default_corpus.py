"""One call from nothing to a trainable dataset: stdlib corpus -> sentencepiece -> .bin/.idx.

Idempotent: a manifest records each stage's parameters and output sizes; a stage whose outputs
exist, match the manifest and are valid is reused, anything else is rebuilt (and later stages with
it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional, TextIO

from megatron_sv.data.corpus import write_stdlib_corpus
from megatron_sv.data.indexed import is_valid_indexed_dataset
from megatron_sv.data.preprocess import iter_input_texts, preprocess
from megatron_sv.data.sentencepiece_training import train_sentencepiece

MANIFEST = "manifest.json"


def _sizes(paths):
    return {os.path.basename(p): os.path.getsize(p) for p in paths}


def prepare_default_corpus(
    output_dir: str,
    vocab_size: int = 8000,
    max_bytes: Optional[int] = None,
    input_sentence_size: int = 200_000,
    workers: int = 2,
    log: Optional[TextIO] = None,
) -> Dict[str, Any]:
    """Write `corpus.jsonl`, `tokenizer.model` and `stdlib_text_document.bin/.idx` into output_dir.
    Returns the manifest (paths are under "data_prefix", "tokenizer_model", "corpus").

    The defaults (8k vocabulary, 200,000 sampled lines for the tokenizer) are those of the committed CPU
    ablation (docs/results/ablation_cpu): on the same Python, they give byte-identical corpus, tokenizer and
    .bin/.idx files."""
    log = log if log is not None else sys.stderr
    os.makedirs(output_dir, exist_ok=True)
    corpus = os.path.join(output_dir, "corpus.jsonl")
    tok_prefix = os.path.join(output_dir, "tokenizer")
    data_prefix = os.path.join(output_dir, "stdlib")
    manifest_path = os.path.join(output_dir, MANIFEST)
    try:
        with open(manifest_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}

    def reusable(stage, params, files):
        entry = old.get(stage)
        return (
            entry is not None
            and entry["params"] == params
            and all(os.path.isfile(p) for p in files)
            and entry["sizes"] == _sizes(files)
        )

    manifest: Dict[str, Any] = {}
    rebuilt = False

    params = {"max_bytes": max_bytes, "python": sys.version.split()[0]}
    if not reusable("corpus", params, [corpus]):
        stats = write_stdlib_corpus(corpus, max_bytes=max_bytes)
        print(
            f"[prepare] wrote {corpus}: {stats.num_docs} files, {stats.num_bytes / 1e6:.1f} MB "
            f"({stats.skipped_empty} empty, {stats.skipped_undecodable} non-UTF-8 skipped)",
            file=log,
        )
        rebuilt = True
    manifest["corpus"] = {"params": params, "sizes": _sizes([corpus])}

    params = {"vocab_size": vocab_size, "input_sentence_size": input_sentence_size}
    model = tok_prefix + ".model"
    if rebuilt or not reusable("tokenizer", params, [model]):
        result = train_sentencepiece(
            iter_input_texts([corpus]), tok_prefix, vocab_size=vocab_size, input_sentence_size=input_sentence_size
        )
        print(f"[prepare] trained {model}: vocab {result.vocab_size} on {result.num_lines_used} lines", file=log)
        rebuilt = True
    manifest["tokenizer"] = {"params": params, "sizes": _sizes([model])}

    doc_prefix = data_prefix + "_text_document"
    files = [doc_prefix + ".bin", doc_prefix + ".idx"]
    params = {"append_eod": True}
    if rebuilt or not reusable("dataset", params, files) or not is_valid_indexed_dataset(doc_prefix):
        stats = preprocess(
            [corpus],
            data_prefix,
            {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model},
            workers=workers,
            append_eod=True,
            overwrite=True,
            log=log,
        )
        manifest["num_tokens"] = stats.total_tokens
    else:
        manifest["num_tokens"] = old.get("num_tokens")
        print(f"[prepare] reusing {doc_prefix}.bin/.idx", file=log)
    manifest["dataset"] = {"params": params, "sizes": _sizes(files)}
    manifest.update(corpus=manifest["corpus"], tokenizer_model=model, data_prefix=doc_prefix)

    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)
    return manifest
