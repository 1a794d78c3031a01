"""The repository's documentation stands on its own: no file refers to notes outside the repository, and
every relative link in the Markdown pages points to a file or folder that exists."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".venv"}
TEXT_SUFFIXES = (".md", ".py", ".sh", ".txt", ".cfg", ".ini", ".toml", "Dockerfile")
# notes that live beside the repository, never in it (spelled in pieces so this file does not match)
OUTSIDE = re.compile(
    "|".join([r"shared/" + "PAPER", r"shared/" + "DESIGN", "PAPER" + r"\.md", "DESIGN" + r"\.md", r"\.\./" + "shared"])
)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _repo_files(suffixes):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(suffixes):
                yield os.path.join(dirpath, name)


def test_no_reference_to_files_outside_the_repository():
    offenders = []
    for path in _repo_files(TEXT_SUFFIXES):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_relative_markdown_links_resolve():
    broken = []
    for path in _repo_files((".md",)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
