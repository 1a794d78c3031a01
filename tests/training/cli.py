"""Drive pretrain_gpt_sv.py through torchrun (gloo, CPU) and read its jsonl metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from tests.helpers.distributed import find_free_port
from tests.helpers.processes import TAG_VAR, kill_tagged, register, tagged_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "pretrain_gpt_sv.py")

# a tiny model on mock data: about 0.1 s per step on 2 cores
TINY = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--swiglu",
    "--untie-embeddings-and-output-weights",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--lr-decay-style",
    "cosine",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "255",
    "--scale-vector-strategy",
    "unified",
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--no-scale-vector-stats",
    "--seed",
    "7",
]


def command(args: Sequence[str], nproc: int, launcher: str = "torch.distributed.run") -> List[str]:
    if nproc == 1:
        return [sys.executable, ENTRY, *args]
    return [
        sys.executable,
        "-m",
        launcher,
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(find_free_port()),
        ENTRY,
        *args,
    ]


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(args: Sequence[str], nproc: int = 2, timeout: float = 240, extra_env: Optional[Dict] = None):
    """Run to completion; whatever the job leaves behind (on timeout, or helpers of killed ranks) is
    killed before returning."""
    e = tagged_env(env())
    e.update(extra_env or {})
    try:
        return subprocess.run(command(args, nproc), cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    finally:
        kill_tagged(e[TAG_VAR])


# at most this many CLI jobs of one test at once: each rank holds a few hundred MB
SIDE_BY_SIDE = 3


def run_side_by_side(*runs: Dict) -> List[subprocess.CompletedProcess]:
    """Several independent ``run(**kwargs)`` at once (up to SIDE_BY_SIDE), results in order: a single-rank
    job uses one core (OMP_NUM_THREADS=1), and a job spends seconds starting up, so jobs side by side keep the
    machine's cores busy instead of waiting for each other."""
    with ThreadPoolExecutor(min(len(runs), SIDE_BY_SIDE)) as pool:
        futures = [pool.submit(run, **kwargs) for kwargs in runs]
    return [f.result() for f in futures]


def start(args: Sequence[str], nproc: int = 2, launcher: str = "torch.distributed.run") -> subprocess.Popen:
    """Start in the background. The test's teardown kills the whole job (tests/conftest.py), also when
    the test fails. ``launcher="megatron_sv.launch"``: torchrun as the launch scripts run it (it survives
    SIGUSR1 and forwards it to the ranks)."""
    e = tagged_env(env())
    register(e[TAG_VAR])
    proc = subprocess.Popen(
        command(args, nproc, launcher),
        cwd=ROOT,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    proc.tag = e[TAG_VAR]
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kill the job: torchrun, the ranks (each in a session of its own) and their helpers."""
    kill_tagged(proc.tag)
    proc.wait(timeout=30)


def read_metrics(path: str, kind: str = "train") -> Dict[int, Dict]:
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] == kind:
                out[rec["iteration"]] = rec
    return out


def losses(path: str) -> Dict[int, float]:
    return {i: r["loss"] for i, r in read_metrics(path).items()}


def wait_for_iteration(path: str, iteration: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(read_metrics(path), default=0) >= iteration:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before iteration {iteration}:\n" + proc.stdout.read()
            )
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result
