"""Find and reap every process a test started, orphans included.

Process trees are not enough: torchrun starts each rank in a session of its own, and a rank that is
killed leaves its helpers (Megatron-Core's checkpoint-writer Manager, about 270 MB each) reparented to
init, outside every tree and group the test knows. An environment variable is inherited by all of them,
though, so each job the tests start carries a tag (``TAG_VAR``) and teardown kills whatever carries it.
Tags are ``<session>-<n>``: one per job, all sharing the pytest session's prefix.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from typing import Dict, List

import psutil

TAG_VAR = "MEGATRON_SV_TEST_JOB"
SESSION = uuid.uuid4().hex[:12]
_counter = itertools.count()


def new_tag() -> str:
    return f"{SESSION}-{next(_counter)}"


def tagged_env(env: Dict[str, str]) -> Dict[str, str]:
    """A copy of ``env`` with a fresh job tag."""
    return {**env, TAG_VAR: new_tag()}


def _tag_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(TAG_VAR.encode() + b"="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return ""


def tagged(prefix: str) -> List[psutil.Process]:
    """Live processes whose job tag is ``prefix`` or starts with ``prefix-``."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        tag = _tag_of(p.pid)
        if tag and (tag == prefix or tag.startswith(prefix + "-")):
            out.append(p)
    return out


def kill_tagged(prefix: str, timeout: float = 10.0) -> List[int]:
    """SIGKILL every process carrying the tag (or tags below it); returns their pids."""
    procs = tagged(prefix)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]


def descendants(pid: int) -> List[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` and every process below it, as Slurm does to all processes of a step
    (``kill -SIG -<pgid>`` misses the ranks: torchrun starts each one in its own session)."""
    for p in [psutil.Process(pid), *descendants(pid)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


_open_jobs: List[str] = []


def register(tag: str) -> str:
    """Remember a job's tag so that the test's teardown reaps it (``reap_registered``)."""
    _open_jobs.append(tag)
    return tag


def reap_registered() -> List[int]:
    killed = []
    while _open_jobs:
        killed += kill_tagged(_open_jobs.pop())
    return killed
