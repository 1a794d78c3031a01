"""Write Megatron-Core indexed datasets (.bin/.idx) atomically.

Builders write to hidden temporary names in the output directory; only when every builder has
finalized are the files renamed into place (.bin first, then .idx, which readers open first). On
any failure the temporaries are removed, so a prefix either has a complete, valid pair or nothing
new. Existing outputs are refused unless `overwrite=True`.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import numpy


def token_dtype(vocab_size: Optional[int]):
    """The smallest dtype Megatron-Core uses for these ids (uint16 below 65,500, else int32)."""
    if vocab_size is not None and vocab_size < 65500:
        return numpy.uint16
    return numpy.int32


def output_paths(prefix: str) -> List[str]:
    return [prefix + ".bin", prefix + ".idx"]


def check_outputs_free(prefixes: Sequence[str], overwrite: bool) -> None:
    """Raise FileExistsError if any output exists and overwriting was not asked for; also check
    the output directories exist and are writable."""
    for prefix in prefixes:
        out_dir = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"output directory {out_dir!r} does not exist")
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"output directory {out_dir!r} is not writable")
        if not overwrite:
            existing = [p for p in output_paths(prefix) if os.path.exists(p)]
            if existing:
                raise FileExistsError(
                    f"output {', '.join(existing)} already exists; pass --overwrite (overwrite=True) to replace it"
                )


class _Writer:
    def __init__(self, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: PLC0415 - megatron.core only when a dataset is written

        self.prefix = prefix
        tag = uuid.uuid4().hex[:8]
        head, name = os.path.split(os.path.abspath(prefix))
        self.tmp_bin = os.path.join(head, f".{name}.bin.tmp-{tag}")
        self.tmp_idx = os.path.join(head, f".{name}.idx.tmp-{tag}")
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.num_docs = 0
        self.num_tokens = 0

    def add_document(self, tokens: numpy.ndarray) -> None:
        """Add one document (one sequence) of token ids."""
        self.builder.add_document(tokens, [len(tokens)])
        self.num_docs += 1
        self.num_tokens += len(tokens)

    def cleanup(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for p in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(p):
                os.unlink(p)


@contextmanager
def atomic_indexed_writers(
    prefixes: Sequence[str], vocab_size: Optional[int], overwrite: bool = False
) -> Iterator[Dict[str, "_Writer"]]:
    """Yield {prefix: writer}; each writer has `add_document(np_tokens)`. On normal exit all
    datasets are finalized and renamed into place; on an exception nothing is left behind."""
    check_outputs_free(prefixes, overwrite)
    dtype = token_dtype(vocab_size)
    writers: Dict[str, _Writer] = {}
    try:
        for p in prefixes:
            writers[p] = _Writer(p, dtype)
        yield writers
        for w in writers.values():
            w.builder.finalize(w.tmp_idx)
        check_outputs_free(prefixes, overwrite)  # someone may have written them meanwhile
        for w in writers.values():
            os.replace(w.tmp_bin, w.prefix + ".bin")
            os.replace(w.tmp_idx, w.prefix + ".idx")
    finally:
        for w in writers.values():
            w.cleanup()


def write_indexed_dataset(
    prefix: str, documents: Sequence[Sequence[int]], vocab_size: Optional[int], overwrite: bool = False
) -> None:
    """Write token-id documents to `{prefix}.bin/.idx` (convenience for small data and tests)."""
    dtype = token_dtype(vocab_size)
    with atomic_indexed_writers([prefix], vocab_size, overwrite) as writers:
        for doc in documents:
            writers[prefix].add_document(numpy.asarray(doc, dtype=dtype))


def is_valid_indexed_dataset(prefix: str) -> bool:
    """Both files exist, the index parses, and the .bin size matches the index."""
    if not all(os.path.isfile(p) for p in output_paths(prefix)):
        return False
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: PLC0415 - megatron.core only when one is read

        ds = IndexedDataset(prefix, mmap=False)
        expected = int(ds.sequence_lengths.sum()) * numpy.dtype(ds.index.dtype).itemsize
        return os.path.getsize(prefix + ".bin") == expected
    except Exception:
        return False
