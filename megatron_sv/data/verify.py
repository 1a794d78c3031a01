"""Start-up checks of indexed datasets (.bin/.idx pairs), each failure one line naming the file.

Megatron-Core trusts its data files: a .bin shorter than its .idx crashes thousands of iterations in,
a .bin paired with another run's .idx trains on garbage, and token ids outside the vocabulary raise
IndexError mid-run (or, below the padded vocabulary size, train silently). Here, before training:
  - the .idx parses and is as long as its header says;
  - the .bin is exactly as long as the .idx describes (sizes, token dtype);
  - the token ids are below the tokenizer's vocabulary size (all of them for small files, evenly
    spaced samples of large ones);
and ``data_stamp`` gives the datasets' index cache a key that changes when the files are regenerated.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy

INDEX_HEADER = b"MMIDIDX\x00\x00"
FULL_SCAN_TOKENS = 64 << 20  # scan every token of files up to this size; sample larger ones
SAMPLE_CHUNKS, SAMPLE_TOKENS = 256, 1 << 16


class DataFileError(ValueError):
    """A dataset file that does not match its pair or the tokenizer."""


@dataclass(frozen=True)
class IndexHeader:
    dtype: numpy.dtype
    sequence_count: int
    document_count: int
    bin_bytes: int  # what the .bin must hold


def read_index_header(prefix: str) -> IndexHeader:
    from megatron.core.datasets.indexed_dataset import DType  # noqa: PLC0415 - megatron.core only when an index is read

    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
        if len(head) < len(INDEX_HEADER) + 25 or head[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise DataFileError(f"{path}: not a Megatron indexed-dataset index (bad header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER) :])
        if version != 1:
            raise DataFileError(f"{path}: unsupported index version {version}")
        try:
            dtype = numpy.dtype(DType.dtype_from_code(code))
        except Exception:  # noqa: BLE001 - megatron's own error: one line here
            raise DataFileError(f"{path}: unknown token dtype code {code}") from None
        expected = len(head) + sequences * (4 + 8) + documents * 8
        if size != expected:
            raise DataFileError(f"{path}: {size} bytes, but its header describes {expected} (truncated or corrupt)")
        bin_bytes = 0
        if sequences:
            lengths = numpy.fromfile(f, dtype=numpy.int32, count=sequences)
            pointers = numpy.fromfile(f, dtype=numpy.int64, count=sequences)
            bin_bytes = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    return IndexHeader(dtype, sequences, documents, bin_bytes)


def max_token_id(prefix: str, dtype: numpy.dtype) -> int:
    tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    if tokens.size <= FULL_SCAN_TOKENS:
        return int(tokens.max()) if tokens.size else -1
    starts = numpy.linspace(0, tokens.size - SAMPLE_TOKENS, SAMPLE_CHUNKS).astype(numpy.int64)
    return max(int(tokens[s : s + SAMPLE_TOKENS].max()) for s in starts)


def check_indexed_dataset(prefix: str, vocab_size: Optional[int] = None) -> IndexHeader:
    """Raise DataFileError (one line, naming the file) unless ``prefix``.bin/.idx form a valid pair
    whose token ids fit ``vocab_size``."""
    header = read_index_header(prefix)
    bin_path = prefix + ".bin"
    actual = os.path.getsize(bin_path)
    if actual != header.bin_bytes:
        raise DataFileError(
            f"{bin_path}: {actual} bytes, but {prefix}.idx describes {header.bin_bytes} bytes of "
            f"{header.dtype.name} tokens (a truncated file, or a .bin and .idx from different runs)"
        )
    if header.sequence_count == 0:
        raise DataFileError(f"{prefix}.idx: the dataset holds no documents")
    if vocab_size is not None:
        top = max_token_id(prefix, header.dtype)
        if top >= vocab_size:
            raise DataFileError(
                f"{bin_path}: token id {top} >= the tokenizer's vocabulary size {vocab_size} (made with "
                "another tokenizer?)"
            )
    return header


def check_datasets(prefixes: Sequence[str], vocab_size: Optional[int] = None) -> None:
    for prefix in prefixes:
        check_indexed_dataset(prefix, vocab_size)


def data_stamp(prefixes: Sequence[str]) -> str:
    """A short key that changes whenever a .bin/.idx is rewritten (path, size, modification time)."""
    h = hashlib.sha1()
    for prefix in prefixes:
        for path in (prefix + ".bin", prefix + ".idx"):
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]
