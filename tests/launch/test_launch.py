"""The launcher (megatron_sv.launch, examples/pretrain_gpt_sv.sh) on this machine, without Slurm:
a bad flag ends a redirected log as one line with its exit code, and SIGUSR1 or SIGTERM sent to the
torchrun agent alone, while the ranks are still starting, reaches every rank once its handler is installed
(and the agent waits for the ranks instead of dying or killing them).
(tests/slurm runs the same script under a real Slurm.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.distributed import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt_sv.sh")


def _local_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env.update(PYTHONPATH=ROOT, PYTHON=sys.executable, **extra)
    return env


def test_bad_flag_through_the_script_ends_a_redirected_log_with_one_line_and_its_code(tmp_path):
    log = tmp_path / "run.log"
    env = _local_env(
        DEVICE="cpu",
        DEFAULT_DATA_DIR=str(tmp_path / "data"),
        VOCAB="400",
        CORPUS_MAX_BYTES="100000",
        EXTRA_ARGS="--no-such-flag",
        SAVE_DIR=str(tmp_path / "run"),
        MASTER_PORT=str(find_free_port()),
    )
    # the way users keep a log: the whole output redirected to one file
    r = subprocess.run(["bash", "-c", f"bash {SCRIPT} > {log} 2>&1"], env=env, timeout=600)
    data = log.read_bytes()
    assert b"\0" not in data  # `tee /dev/stderr` used to rewrite the redirected file from its start
    text = data.decode()
    lines = [line for line in text.splitlines() if line.strip()]
    assert r.returncode == 2, text
    assert "[prepare] trained" in text and "data: " in text  # the corpus step's progress is in the log
    assert lines[-1].startswith("pretrain_gpt_sv.py: error:") and "--no-such-flag" in lines[-1], text
    assert text.count("pretrain_gpt_sv.py: error:") == 1  # rank 0 reports, the other rank is silent
    assert "Traceback" not in text and "ChildFailedError" not in text, text


WORKER = """
import os, sys, time
open(os.path.join(sys.argv[1], "started-" + os.environ["LOCAL_RANK"]), "w").close()
time.sleep(3)  # still importing: no handler yet
from megatron_sv.training.signals import ExitSignalHandler
handler = ExitSignalHandler().install()
deadline = time.time() + 30
while not handler.received and time.time() < deadline:
    time.sleep(0.05)
print(f"rank {os.environ['RANK']}: {handler.name or 'no signal'}", flush=True)
handler.restore()
sys.exit(0 if handler.received else 1)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_to_the_agent_during_start_up_reaches_every_rank(tmp_path, sig):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_sv.launch",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(find_free_port()),
            str(worker),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_local_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"started-{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        os.kill(proc.pid, sig)  # the agent only, as `kill -USR1 <torchrun>` outside Slurm
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    name = signal.Signals(sig).name
    assert f"rank 0: {name}" in out and f"rank 1: {name}" in out, out
