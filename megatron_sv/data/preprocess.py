"""Tokenize documents into Megatron-Core indexed datasets, in parallel, with ordered output.

Pipeline: the main process cuts the inputs into work units (about `unit_bytes` of jsonl lines,
or a few plain-text files), worker processes parse and tokenize whole units with the tokenizer's
batch encoder, and the main process writes the results in input order, so the output is the same
for any number of workers. At most `window` units are in flight, which bounds memory.

Inputs: `.jsonl`/`.json` files are JSON lines (one object per line, documents under `json_keys`);
any other file is one plain-text document. Blank jsonl lines are ignored; malformed ones
(bad JSON, not an object, missing or non-string key) fail the run with `file:line`, or with
`on_malformed="skip"` are skipped and counted. Documents with no tokens are skipped and counted.
One output per key: `{output_prefix}_{key}_document.bin/.idx`, written atomically.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy

from megatron_sv.data.indexed import atomic_indexed_writers, check_outputs_free, token_dtype
from megatron_sv.data.tokenizers import build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json")


class MalformedInputError(ValueError):
    pass


class EmptyDatasetError(ValueError):
    """No document survived (empty inputs, or every line skipped): training could not use it."""


@dataclass
class PreprocessStats:
    num_docs: int = 0  # documents read (valid jsonl lines / text files)
    num_bytes: int = 0  # input bytes of those documents
    num_tokens: Dict[str, int] = field(default_factory=dict)  # written, incl. eod, per key
    num_written: Dict[str, int] = field(default_factory=dict)  # documents written per key
    num_empty: Dict[str, int] = field(default_factory=dict)  # skipped: no tokens, per key
    num_malformed: int = 0
    malformed_examples: List[str] = field(default_factory=list)
    seconds: float = 0.0
    output_prefixes: Dict[str, str] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand globs (sorted within each pattern); every pattern must match an existing file."""
    files: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no files")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"input {pattern!r} does not exist or is not a file")
    return files


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------------
# Work units. ("jsonl", path, first_line_number, [raw lines]) or ("text", [paths]).


def _units(files: Sequence[str], unit_bytes: int, unit_docs: int) -> Iterator[Tuple]:
    text_batch: List[str] = []
    text_bytes = 0
    for path in files:
        if not is_jsonl(path):
            text_batch.append(path)
            text_bytes += os.path.getsize(path)
            if text_bytes >= unit_bytes or len(text_batch) >= unit_docs:
                yield ("text", text_batch)
                text_batch, text_bytes = [], 0
            continue
        if text_batch:
            yield ("text", text_batch)
            text_batch, text_bytes = [], 0
        with open(path, "rb") as f:
            lines: List[bytes] = []
            size = 0
            first = 1
            for lineno, line in enumerate(f, start=1):
                if not lines:
                    first = lineno
                lines.append(line)
                size += len(line)
                if size >= unit_bytes or len(lines) >= unit_docs:
                    yield ("jsonl", path, first, lines)
                    lines, size = [], 0
            if lines:
                yield ("jsonl", path, first, lines)
    if text_batch:
        yield ("text", text_batch)


_worker: Dict[str, Any] = {}


def _init_worker(tokenizer_args: Dict[str, Any], json_keys: Sequence[str], append_eod: bool) -> None:
    _worker["tokenizer"] = build_tokenizer(**tokenizer_args)
    _worker["json_keys"] = list(json_keys)
    _worker["append_eod"] = append_eod


def _parse_unit(unit: Tuple, json_keys: Sequence[str]):
    """Return (docs: list of (location, {key: text}), malformed: list of 'file:line: why', bytes)."""
    docs, malformed, nbytes = [], [], 0
    if unit[0] == "text":
        for path in unit[1]:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                malformed.append(f"{path}: not valid UTF-8 ({e})")
                continue
            nbytes += len(raw)
            docs.append((path, {json_keys[0]: text}))
        return docs, malformed, nbytes
    _, path, first, lines = unit
    for lineno, raw in enumerate(lines, start=first):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            malformed.append(f"{where}: invalid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            malformed.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        texts = {}
        for key in json_keys:
            value = obj.get(key)
            if not isinstance(value, str):
                why = "missing" if key not in obj else f"not a string ({type(value).__name__})"
                malformed.append(f"{where}: key {key!r} {why}")
                break
            texts[key] = value
        else:
            nbytes += len(raw)
            docs.append((where, texts))
    return docs, malformed, nbytes


def _encode_unit(unit: Tuple):
    tok = _worker["tokenizer"]
    keys = _worker["json_keys"]
    docs, malformed, nbytes = _parse_unit(unit, keys)
    try:
        per_key = {k: tok.tokenize_batch([d[1][k] for d in docs]) for k in keys}
    except Exception:
        # Find the documents the tokenizer rejects, report them like malformed lines.
        per_key = {k: [] for k in keys}
        kept = []
        for where, texts in docs:
            try:
                ids = {k: tok.tokenize(texts[k]) for k in keys}
            except Exception as e:
                malformed.append(f"{where}: tokenizer failed ({e})")
                continue
            kept.append((where, texts))
            for k in keys:
                per_key[k].append(ids[k])
        docs = kept
    dtype = token_dtype(tok.vocab_size)
    out = {}
    for k in keys:
        seqs = [s for s in per_key[k] if len(s) > 0]
        empty = len(per_key[k]) - len(seqs)
        if _worker["append_eod"]:
            eod = tok.eod
            for s in seqs:
                s.append(eod)
        lengths = numpy.fromiter((len(s) for s in seqs), dtype=numpy.int64, count=len(seqs))
        flat = numpy.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
        out[k] = (flat, lengths, empty)
    return len(docs), nbytes, malformed, out


# ---------------------------------------------------------------------------------------------


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_args: Dict[str, Any],
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    log_interval: int = 1000,
    on_malformed: str = "fail",
    overwrite: bool = False,
    unit_bytes: int = 1 << 19,
    unit_docs: int = 1024,
    max_inflight_bytes: int = 64 << 20,
    log: Optional[TextIO] = None,
    allow_empty: bool = False,
) -> PreprocessStats:
    log = log if log is not None else sys.stderr
    if on_malformed not in ("fail", "skip"):
        raise ValueError(f"on_malformed must be 'fail' or 'skip', got {on_malformed!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"json_keys must be distinct and non-empty, got {json_keys}")

    # Everything that can be checked is checked before any work.
    files = expand_inputs(inputs)
    if len(json_keys) > 1 and not all(is_jsonl(f) for f in files):
        raise ValueError("several --json-keys need jsonl inputs; plain-text files hold one document")
    tokenizer = build_tokenizer(**tokenizer_args)
    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    check_outputs_free(list(prefixes.values()), overwrite)

    stats = PreprocessStats(output_prefixes=dict(prefixes))
    for k in json_keys:
        stats.num_tokens[k] = stats.num_written[k] = stats.num_empty[k] = 0
    start = time.perf_counter()
    next_log = log_interval

    def progress(final: bool = False) -> None:
        dt = max(time.perf_counter() - start, 1e-9)
        toks = stats.total_tokens
        print(
            f"[preprocess] {'done: ' if final else ''}{stats.num_docs} docs, {toks} tokens, "
            f"{stats.num_bytes / 1e6:.1f} MB in {dt:.1f} s | {stats.num_docs / dt:.0f} docs/s, "
            f"{toks / dt:,.0f} tokens/s, {stats.num_bytes / 1e6 / dt:.1f} MB/s",
            file=log,
            flush=True,
        )

    # Start workers before the main process imports megatron.core (done by the writers): forks
    # stay light, and the workers tokenize the first units while that import runs.
    ctx = _mp_context()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_args, json_keys, append_eod))
    try:
        units = _units(files, unit_bytes, unit_docs)
        # A deep window lets the workers run ahead while the main process imports megatron.core.
        window = max(8 * workers, max_inflight_bytes // unit_bytes)
        pending = deque(pool.apply_async(_encode_unit, (u,)) for u in itertools.islice(units, window))
        with atomic_indexed_writers(list(prefixes.values()), tokenizer.vocab_size, overwrite) as writers:
            while pending:
                n_docs, nbytes, malformed, out = pending.popleft().get()
                for u in itertools.islice(units, 1):
                    pending.append(pool.apply_async(_encode_unit, (u,)))
                if malformed:
                    if on_malformed == "fail":
                        raise MalformedInputError(
                            f"malformed input at {malformed[0]} (use --on-malformed skip to skip such lines)"
                        )
                    stats.num_malformed += len(malformed)
                    for m in malformed:
                        if len(stats.malformed_examples) < 10:
                            stats.malformed_examples.append(m)
                            print(f"[preprocess] skipping malformed input at {m}", file=log)
                stats.num_docs += n_docs
                stats.num_bytes += nbytes
                for k, (flat, lengths, empty) in out.items():
                    w = writers[prefixes[k]]
                    offset = 0
                    for n in lengths.tolist():
                        w.add_document(flat[offset : offset + n])
                        offset += n
                    stats.num_tokens[k] += int(flat.size)
                    stats.num_written[k] += int(lengths.size)
                    stats.num_empty[k] += empty
                if log_interval > 0 and stats.num_docs >= next_log:
                    progress()
                    next_log = (stats.num_docs // log_interval + 1) * log_interval
            empty = [prefixes[k] for k in json_keys if stats.num_written[k] == 0]
            if empty and not allow_empty:  # raised inside the writers: nothing is written
                raise EmptyDatasetError(
                    f"{empty[0]}: no documents to write ({stats.num_docs} read, all empty or skipped); "
                    "refusing to write an empty dataset (--allow-empty to write it anyway)"
                )
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    stats.seconds = time.perf_counter() - start
    progress(final=True)
    for k in json_keys:
        if stats.num_empty[k]:
            print(f"[preprocess] key {k!r}: skipped {stats.num_empty[k]} empty documents", file=log)
    if stats.num_malformed:
        print(f"[preprocess] skipped {stats.num_malformed} malformed inputs", file=log)
    return stats


def iter_input_texts(inputs: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield the document texts of the same inputs `preprocess` reads (for tokenizer training);
    malformed jsonl lines raise MalformedInputError with file:line."""
    files = expand_inputs(inputs)
    for path in files:
        unit = ("jsonl", path, 1, open(path, "rb").readlines()) if is_jsonl(path) else ("text", [path])
        docs, malformed, _ = _parse_unit(unit, list(json_keys))
        if malformed:
            raise MalformedInputError(f"malformed input at {malformed[0]}")
        for _, texts in docs:
            yield from texts.values()
