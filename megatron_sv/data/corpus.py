"""The embedded default corpus: the Python standard library's own .py source.

Every machine with Python has it, so tests, examples and benchmarks need no download. The file
list is sorted by relative path (deterministic across machines with the same Python), third-party
`site-packages`/`dist-packages` are excluded, empty files are skipped, and files that are not UTF-8
(a few encoding tests) are skipped and counted. Files are read as bytes so "\\r\\n" survives.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_python_files(root: Optional[str] = None) -> List[str]:
    """Relative paths ("/"-separated) of the .py files under the stdlib, sorted."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


@dataclass
class CorpusStats:
    num_docs: int = 0
    num_bytes: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0


def iter_stdlib_documents(
    root: Optional[str] = None, max_bytes: Optional[int] = None, stats: Optional[CorpusStats] = None
) -> Iterator[Tuple[str, str]]:
    """Yield (relative_path, text) in sorted order. With `max_bytes`, stop once the documents
    yielded so far hold at least that many UTF-8 bytes (the last one may cross the limit)."""
    root = root or stdlib_root()
    stats = stats if stats is not None else CorpusStats()
    for rel in stdlib_python_files(root):
        if max_bytes is not None and stats.num_bytes >= max_bytes:
            return
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        if not raw:
            stats.skipped_empty += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_undecodable += 1
            continue
        stats.num_docs += 1
        stats.num_bytes += len(raw)
        yield rel, text


def write_stdlib_corpus(path: str, max_bytes: Optional[int] = None, root: Optional[str] = None) -> CorpusStats:
    """Write the corpus as jsonl lines {"text": ..., "path": ...}, atomically."""
    stats = CorpusStats()
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rel, text in iter_stdlib_documents(root, max_bytes, stats):
                f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False))
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return stats
