"""A real Slurm cluster on this machine for the session: Debian's munge, slurmctld and slurmd (22.05).

Nothing is installed here (.ci/run installs the packages: apt-get install slurmd slurmctld slurm-client munge);
where the binaries are absent the Slurm tests skip and say so. The fixture writes a slurm.conf and a munge key
under a temporary directory, starts munged, slurmctld and two slurmd (two "nodes" on this host, on their own
ports: `slurmd -N <name>`), waits until `srun` runs on both, and on teardown cancels every job, waits for the
jobs' processes to end and stops the daemons, also when a test failed. Clients find the cluster through
SLURM_CONF (in ``cluster.env``), so the machine's own /etc/slurm is neither read nor changed.

The two node names must resolve to this host: the launch script's rendezvous address is the job's first node
name (on a real cluster, a node's hostname). We use this host's name and ``localhost``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
KILL_WAIT_S = 30  # Slurm's default: the time between SIGTERM and SIGKILL for the exit save
# A requeued job waits cred_expire seconds before it may start again (slurm.conf(5); default 120 s): 30 s is
# still ample for a step's credential on a busy 2-core machine (srun starts its step within seconds).
CRED_EXPIRE_S = 30
# The main scheduling loop's period (default 60 s). Jobs are also scheduled at once on events (a submission,
# a job's end), but a job whose dependency has just been satisfied can wait for this loop.
SCHED_INTERVAL_S = 5
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolves_here(name: str) -> bool:
    try:
        return socket.gethostbyname(name).startswith("127.") or socket.gethostbyname(name) in {
            a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)
        }
    except OSError:
        return False


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return max(1024, total_kb // 1024 - 1024)  # leave a margin, or slurmd drains the node as "low memory"


@dataclass
class SlurmCluster:
    root: str
    conf: str
    nodes: List[str]
    env: Dict[str, str]
    procs: List[subprocess.Popen] = field(default_factory=list)

    def cmd(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}\n" + self.logs()
            )
        return r

    def sbatch(self, *args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> int:
        r = subprocess.run(
            ["sbatch", "--parsable", *args], env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states, timeout: float) -> Dict[str, str]:
        """Poll until the job's state is one of ``states``; returns its scontrol record."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise AssertionError(
                    f"job {job_id} still {info.get('JobState')} after {timeout} s "
                    f"(waiting for {sorted(states)})\n" + self.logs()
                )
            time.sleep(0.5)

    def wait_done(self, job_id: int, timeout: float) -> Dict[str, str]:
        return self.wait_for(job_id, FINAL_STATES, timeout)

    def logs(self, tail: int = 15) -> str:
        parts = []
        log_dir = os.path.join(self.root, "log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------ teardown
    def cancel_all_jobs(self, timeout: float = KILL_WAIT_S + 30) -> None:
        r = self.cmd("squeue", "-h", "-o", "%i", check=False)
        ids = r.stdout.split()
        if ids:
            self.cmd("scancel", *ids, check=False)
        deadline = time.time() + timeout
        while ids and time.time() < deadline:
            if not self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split():
                break
            time.sleep(0.5)

    def job_processes(self) -> List[int]:
        """Processes started by this cluster's jobs (their environment names our slurm.conf)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if marker in f.read().split(b"\0"):
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


def _write_conf(root: str, host: str, nodes: List[str], munge_socket: str) -> str:
    ctld_port = _free_port()
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count() or 1} "
        f"RealMemory={_real_memory_mb()} State=UNKNOWN"
        for n in nodes
    )
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    conf = f"""\
ClusterName=svtest{os.getpid()}
FirstJobId={random.randint(1000, 9000)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
MpiDefault=none
ReturnToService=2
KillWait={KILL_WAIT_S}
InactiveLimit=0
MinJobAge=3600
SlurmdTimeout=300
{node_lines}
PartitionName=test Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm/munge binaries absent ({', '.join(missing)}); install them with "
            "`apt-get install -y slurmd slurmctld slurm-client munge` (.ci/run does)"
        )
    host = socket.gethostname().split(".")[0]
    nodes = [host] + [n for n in ("localhost",) if n != host and _resolves_here(n)]
    # short paths: the munge socket path must fit in a unix socket address (108 bytes); munged wants every
    # directory above its socket to be world-searchable
    root = tempfile.mkdtemp(prefix="svslurm-", dir="/tmp")
    os.chmod(root, 0o755)
    for d in ("munge", "key", "state", "log", *(f"spool/{n}" for n in nodes)):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "key"), 0o700)
    key = os.path.join(root, "key", "munge.key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(os.urandom(1024))
    munge_socket = os.path.join(root, "munge", "munge.sock")
    conf = _write_conf(root, host, nodes, munge_socket)
    env = dict(os.environ, SLURM_CONF=conf)
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]  # a test session started inside a Slurm job must not leak that job into ours
    cluster = SlurmCluster(root=root, conf=conf, nodes=nodes, env=env)

    # the daemons get their config by -f; without SLURM_CONF in their environment, job_processes() finds
    # only what the jobs started (sbatch passes the submitter's environment, SLURM_CONF included, to them)
    daemon_env = {k: v for k, v in env.items() if k != "SLURM_CONF"}

    def start(*args: str, log: str) -> None:
        with open(os.path.join(root, "log", log), "ab") as out:
            cluster.procs.append(
                subprocess.Popen(
                    list(args), env=daemon_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    try:
        start(
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={munge_socket}",
            f"--pid-file={root}/munge/munged.pid",
            f"--seed-file={root}/munge/munged.seed",
            f"--log-file={root}/log/munged.log",
            log="munged.out",
        )
        deadline = time.time() + 30
        while not os.path.exists(munge_socket):
            if time.time() > deadline or cluster.procs[0].poll() is not None:
                raise AssertionError("munged did not start\n" + cluster.logs())
            time.sleep(0.1)
        start("slurmctld", "-D", "-i", "-f", conf, log="slurmctld.out")
        for n in nodes:
            start("slurmd", "-D", "-N", n, "-f", conf, log=f"slurmd-{n}.out")
        deadline = time.time() + 90
        while True:
            r = cluster.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and len(states) == len(nodes) and set(states.values()) == {"idle"}:
                break
            dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise AssertionError(
                    f"the Slurm cluster did not come up (exited: {dead}; sinfo: {r.stdout} "
                    f"{r.stderr})\n" + cluster.logs()
                )
            time.sleep(0.5)
        r = cluster.cmd(
            "srun",
            f"--nodes={len(nodes)}",
            "--ntasks-per-node=1",
            "--time=1",
            "bash",
            "-c",
            "echo $SLURMD_NODENAME",
            timeout=60,
        )
        assert sorted(r.stdout.split()) == sorted(nodes), r.stdout
        yield cluster
    finally:
        try:
            cluster.cancel_all_jobs()
        finally:
            for pid in cluster.job_processes():  # whatever a job left behind, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in reversed(cluster.procs):
                _stop(p)
            shutil.rmtree(root, ignore_errors=True)
