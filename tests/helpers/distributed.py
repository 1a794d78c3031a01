"""Run a function on N local processes joined by a gloo process group (test helper).

``run_distributed(fn, world_size=2, args=())`` spawns ``world_size`` processes; rank r runs
``fn(r, world_size, *args)`` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (the
function itself calls initialize_distributed or init_process_group). It returns the list of
return values by rank, raises ``DistributedTestError`` carrying every failed rank's traceback,
and kills every rank on timeout. ``fn`` must be importable (module level) and its result
picklable.

``run_side_by_side(job, job, ...)`` runs several such jobs at once (each a dict of run_distributed's
arguments) and returns their results in order: a single-rank reference run uses one core
(OMP_NUM_THREADS=1), so it can run next to a two-rank job or a second single-rank job instead of before it.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

from tests.helpers.processes import TAG_VAR, kill_tagged, new_tag


class DistributedTestError(RuntimeError):
    pass


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, args, env, queue):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        # plain pickle copies tensor data; torch's queue pickler would share file descriptors
        # that die with this process
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


_environ_lock = threading.Lock()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 240.0,
    env: Optional[Dict[str, str]] = None,
) -> List[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    child_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        **(env or {}),
    }
    # OMP_NUM_THREADS must be in the environment before the child imports torch; the job tag lets the
    # teardown find the ranks' helper processes even after a killed rank orphaned them. The lock: jobs
    # started side by side (run_side_by_side) must not see each other's tag.
    tag = new_tag()
    procs = []
    with _environ_lock:
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", TAG_VAR)}
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ[TAG_VAR] = tag
        try:
            for rank in range(world_size):
                p = ctx.Process(target=_worker, args=(fn, rank, world_size, tuple(args), child_env, queue))
                p.start()
                procs.append(p)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    results: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while len(results) + len(failures) < world_size:
            if not queue.empty():
                rank, ok, payload = queue.get()
                if ok:
                    results[rank] = pickle.loads(payload)
                else:
                    failures[rank] = payload
                continue
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in failures]
            if dead and queue.empty():
                time.sleep(0.5)  # let a last message arrive
                if queue.empty():
                    for r in dead:
                        failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                    if failures:
                        # a dead rank usually leaves the others blocked in a collective
                        break
            if time.monotonic() > deadline:
                for r in range(world_size):
                    if r not in results and r not in failures:
                        failures[r] = f"rank {r} timed out after {timeout:.0f} s"
                break
            if failures:
                first_failure = first_failure or time.monotonic()
                # give the other ranks a moment to report their own errors, then stop
                if time.monotonic() > first_failure + 10.0:
                    break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        kill_tagged(tag)

    if failures:
        parts = [f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures)]
        missing = [r for r in range(world_size) if r not in results and r not in failures]
        if missing:
            parts.append(f"(ranks {missing} were killed while still running)")
        raise DistributedTestError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]


def run_side_by_side(*jobs: Dict[str, Any]) -> List[Any]:
    """Run several run_distributed jobs at the same time (each a dict of its keyword arguments); returns
    each job's result in order. Every job runs to its end; then the first failure is raised."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run_distributed, **job) for job in jobs]
    return [f.result() for f in futures]
