"""Preemption through the real CLI on 2 ranks: a signal sent to every process of the job (torchrun, the
ranks, the checkpoint writer's helper processes), as Slurm and ``scancel`` do, at any moment, ends with
a tracker that names a complete checkpoint, which the same command then resumes from.
Before the fix, the writer's helpers died: BrokenPipeError at the exit save, and with --async-save
no tracker at all (even the earlier complete checkpoint was lost).

One chain of runs in one directory (--load = --save) covers the timings; each run resumes from the
checkpoint the previous one left, which shows that it loads (the last one is checked in-process):
  1. SIGTERM before the first save                              (sync)
  2. SIGUSR1 while a periodic save is being written             (sync; via megatron_sv.launch, as the
                                                                launch scripts run torchrun)
  3. SIGINT, then SIGTERM, while an async save is being written (the second signal lands in the exit save)
  4. SIGTERM between two saves                                  (async)
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from megatron_sv.checkpointing import read_tracker
from megatron_sv.checkpointing.layout import list_iterations
from tests.helpers.processes import descendants, signal_tree, wait_until
from tests.training.cli import TINY, read_metrics, start, wait_for_iteration


def _ranks(proc):
    return [p for p in descendants(proc.pid) if "pretrain_gpt_sv.py" in " ".join(p.cmdline()) and p.ppid() == proc.pid]


def _writer_running(proc) -> bool:
    """A checkpoint is being written: a rank has a forked child (the file writer, or the async save
    process), i.e. a child process with the rank's own command line."""
    try:
        for rank in _ranks(proc):
            cmd = rank.cmdline()
            if any(c.cmdline() == cmd for c in rank.children()):
                return True
    except psutil.NoSuchProcess:
        pass
    return False


def _rank_errors(out: str):
    """Tracebacks of the ranks (torchrun itself ends with one on SIGTERM/SIGINT: SignalException)."""
    return [line for line in out.splitlines() if line.startswith("[rank") and "Traceback" in line]


def _finish(proc, ckpt, metrics):
    out, _ = proc.communicate(timeout=150)
    tracker = read_tracker(ckpt)  # raises if the tracker names an incomplete checkpoint
    return out, tracker, max(read_metrics(metrics))


@pytest.mark.timeout(600)  # four jobs in a row
def test_signals_to_the_whole_job_leave_a_complete_checkpoint(tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    base = [
        *TINY,
        "--train-iters",
        "100000",
        "--lr-decay-iters",
        "1000",
        "--save",
        ckpt,
        "--load",
        ckpt,
        "--metrics-file",
        metrics,
    ]

    # 1. before the first save; a killed earlier attempt left an incomplete first save behind, which
    # the same command ignores (it used to refuse: "none was completed") and then cleans up
    os.makedirs(os.path.join(ckpt, "iter_0000001"))
    open(os.path.join(ckpt, "iter_0000001", "__0_0.distcp"), "wb").close()
    proc = start([*base, "--save-interval", "1000"])
    wait_for_iteration(metrics, 2, proc)
    signal_tree(proc.pid, signal.SIGTERM)
    out, k1, last = _finish(proc, ckpt, metrics)
    assert "received SIGTERM" in out and not _rank_errors(out), out[-4000:]
    assert "ignoring incomplete checkpoint directories [1]" in out
    assert k1 == last >= 2 and list_iterations(ckpt) == [k1]

    # 2. during a sync save; the chain's runs resume from the previous checkpoint
    os.remove(metrics)
    proc = start([*base, "--save-interval", "3"], launcher="megatron_sv.launch")
    assert wait_until(lambda: _writer_running(proc) or proc.poll() is not None, 120)
    signal_tree(proc.pid, signal.SIGUSR1)
    out, k2, last = _finish(proc, ckpt, metrics)
    assert f"loaded checkpoint of iteration {k1}" in out, out[-4000:]
    assert min(read_metrics(metrics)) == k1 + 1
    assert proc.returncode == 0 and "received SIGUSR1" in out and not _rank_errors(out), out[-4000:]
    assert k2 == last > k1

    # 3. during an async save, two signals
    os.remove(metrics)
    proc = start([*base, "--save-interval", "3", "--async-save"])
    assert wait_until(lambda: _writer_running(proc) or proc.poll() is not None, 120)
    signal_tree(proc.pid, signal.SIGINT)
    assert wait_until(lambda: _writer_running(proc) or proc.poll() is not None, 60)
    signal_tree(proc.pid, signal.SIGTERM)
    out, k3, last = _finish(proc, ckpt, metrics)
    assert f"loaded checkpoint of iteration {k2}" in out and min(read_metrics(metrics)) == k2 + 1
    assert ("received SIGINT" in out or "received SIGTERM" in out) and not _rank_errors(out), out[-4000:]
    assert k3 == last > k2

    # 4. between two saves (after one has completed)
    os.remove(metrics)
    proc = start([*base, "--save-interval", "3", "--async-save"])
    assert wait_until(lambda: (read_tracker(ckpt) or 0) > k3 or proc.poll() is not None, 120)
    signal_tree(proc.pid, signal.SIGTERM)
    out, k4, last = _finish(proc, ckpt, metrics)
    assert f"loaded checkpoint of iteration {k3}" in out and not _rank_errors(out), out[-4000:]
    assert k4 == last > k3

    _check_loadable(ckpt, k4)


def _check_loadable(root: str, iteration: int) -> None:
    """What a resume reads first, without starting another job: the common state, and the tensor
    metadata, whose every storage file exists."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_sv.checkpointing import checkpoint_dir
    from megatron_sv.checkpointing.dist import load_common

    assert load_common(root, iteration)["iteration"] == iteration
    ckpt = checkpoint_dir(root, iteration)
    metadata = FileSystemReader(ckpt).read_metadata()
    files = {info.relative_path for info in metadata.storage_data.values()}
    assert files and all(os.path.getsize(os.path.join(ckpt, f)) > 0 for f in files)
