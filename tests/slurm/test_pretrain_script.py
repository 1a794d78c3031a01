"""examples/pretrain_gpt_sv.sh under a real Slurm (tests/slurm/conftest.py): sbatch, preemption by the time
limit's SIGUSR1 warning, scancel --signal=USR1 and plain scancel, requeue, and two nodes.

The jobs run the script unchanged, in its Slurm mode on CPU: srun starts one torchrun (megatron_sv.launch) per
node, the ranks are gloo ranks. A tiny model on a small stdlib corpus through the script's environment
variables. Every run uses the same TRAIN_ITERS (the LR schedule and Megatron's data order depend on it), so
"the losses of an uninterrupted run" are compared exactly, iteration by iteration.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.slurm.conftest import CRED_EXPIRE_S
from tests.training.cli import losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt_sv.sh")
ITERS = 50  # the finishing runs (reference, requeue, two nodes): a few seconds of training
LONG_ITERS = 5000  # preempted runs: far longer than any job here lives; preemption ends them
JOB_TIMEOUT = 300

TINY = dict(
    DEVICE="cpu",
    MODEL="tiny",
    NUM_LAYERS="2",
    HIDDEN_SIZE="64",
    NUM_HEADS="4",
    SEQ_LENGTH="32",
    MBS="2",
    GBS="8",
    WARMUP="2",
    LOG_INTERVAL="1",
    EVAL_ITERS="0",
    SAVE_INTERVAL="100000",
    STRATEGY="unified",
    EXTRA_ARGS="--no-scale-vector-stats",
    PYTHON=sys.executable,
    PYTHONUNBUFFERED="1",
)

LOAD_CHECK = """
import sys, torch
from megatron_sv.checkpointing.model_io import read_checkpoint_args, shape_from_args, sv_config_from_args
from megatron_sv.conversion import megatron_model as M
iteration, args = read_checkpoint_args(sys.argv[1])
model = M.build_model(shape_from_args(args), sv_config_from_args(args))
M.load_model_checkpoint(sys.argv[1], model)
t = torch.arange(32)[None] % 400
with torch.no_grad():
    logits = model(t, torch.arange(32)[None], None)
assert torch.isfinite(logits).all()
print("LOADED", iteration, tuple(logits.shape))
"""

# the whole module takes 3-6 minutes on 2 busy cores; each test gets room for its jobs (plus the session's
# cluster and corpus set-up in the first one)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small stdlib corpus and tokenizer, built once by the tool the script itself calls."""
    out = str(tmp_path_factory.mktemp("corpus"))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "prepare_default_corpus.py"),
            "--output-dir",
            out,
            "--vocab-size",
            "400",
            "--max-bytes",
            "300000",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert r.returncode == 0, r.stderr
    values = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert set(values) == {"DATA_PATH", "TOKENIZER_MODEL", "NUM_TOKENS"}, r.stdout  # stdout: exactly these
    return dict(dir=out, DATA_PATH=values["DATA_PATH"], TOKENIZER_MODEL=values["TOKENIZER_MODEL"])


def submit(cluster, save_dir, iters, *sbatch_args, data=None, **env_overrides) -> int:
    # MASTER_PORT is left to the script (derived from the job id, the same after a requeue, outside the
    # ephemeral range where the free ports of other processes on this machine come from)
    env = dict(cluster.env, **TINY, SAVE_DIR=str(save_dir), TRAIN_ITERS=str(iters), PYTHONPATH=ROOT)
    for k in ("DATA_PATH", "TOKENIZER_MODEL", "DEFAULT_DATA_DIR", "NPROC_PER_NODE", "GPUS_PER_NODE", "MASTER_PORT"):
        env.pop(k, None)
    env.update(data or {})
    env.update(env_overrides)
    os.makedirs(save_dir, exist_ok=True)
    # the script's #SBATCH header asks for 2 GPU nodes for 4 h; a CPU job overrides it on the command line
    return cluster.sbatch(
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        f"--cpus-per-task={os.cpu_count() or 1}",
        "--time=6",
        "--open-mode=append",
        f"--output={save_dir}/slurm-%j.out",
        *sbatch_args,
        SCRIPT,
        env=env,
        cwd=ROOT,
    )


def output(save_dir, job_id) -> str:
    path = os.path.join(save_dir, f"slurm-{job_id}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def logged_iterations(text: str):
    return [int(m) for m in re.findall(r"^ iteration\s+(\d+)/", text, re.M)]


def exit_iteration(text: str, signal_name: str) -> int:
    m = re.search(rf"exiting at iteration (\d+): received {signal_name}; checkpoint in (\S+)", text)
    assert m, f"no exit on {signal_name} in the job output:\n{text[-3000:]}"
    return int(m.group(1))


def tracker(save_dir) -> int:
    with open(os.path.join(save_dir, "checkpoints", "latest_checkpointed_iteration.txt")) as f:
        return int(f.read().strip())


def wait_for_iteration(cluster, job_id, save_dir, iteration, timeout=JOB_TIMEOUT):
    metrics = os.path.join(save_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while max(losses(metrics), default=0) < iteration:
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(
                f"job {job_id} is {state} before iteration {iteration}:\n" + output(save_dir, job_id)[-3000:]
            )
        if time.time() > deadline:
            raise AssertionError(
                f"job {job_id}: no iteration {iteration} after {timeout} s\n" + output(save_dir, job_id)[-3000:]
            )
        time.sleep(0.3)


def assert_completed(info, text):
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, text[-3000:])


@pytest.fixture(scope="module")
def reference(slurm_cluster, corpus, tmp_path_factory):
    """One uninterrupted sbatch run of ITERS iterations, with the script preparing its default data (reused
    from the corpus fixture's directory)."""
    save = tmp_path_factory.mktemp("reference")
    job = submit(slurm_cluster, save, ITERS, DEFAULT_DATA_DIR=corpus["dir"], VOCAB="400", CORPUS_MAX_BYTES="300000")
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT)
    return dict(
        save=save, job=job, info=info, text=output(save, job), losses=losses(os.path.join(save, "metrics.jsonl"))
    )


def test_sbatch_trains_names_the_checkpoint_and_it_loads(reference, corpus):
    save, text = reference["save"], reference["text"]
    assert_completed(reference["info"], text)
    ckpt = os.path.join(save, "checkpoints")
    assert f"data: {corpus['DATA_PATH']}" in text  # the script's own data step, reusing the prepared files
    assert f"done: iteration {ITERS}" in text and f"checkpoints in {ckpt}" in text, text[-2000:]
    assert f"checkpoints: {ckpt}" in text
    assert "rendezvous" in text and "1 node(s) x 2 ranks" in text  # the Slurm launch path, not the local one
    assert sorted(reference["losses"]) == list(range(1, ITERS + 1))
    assert tracker(save) == ITERS
    r = subprocess.run(
        [sys.executable, "-c", LOAD_CHECK, ckpt],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore"),
    )
    assert r.returncode == 0 and f"LOADED {ITERS} (1, 32," in r.stdout, r.stdout + r.stderr


def test_preemption_saves_and_the_same_command_resumes_with_uninterrupted_losses(slurm_cluster, corpus, tmp_path):
    cluster, save, data = (
        slurm_cluster,
        tmp_path / "run",
        dict(DATA_PATH=corpus["DATA_PATH"], TOKENIZER_MODEL=corpus["TOKENIZER_MODEL"]),
    )
    ends = []  # (job, exit iteration)

    # 1. the time limit's warning: Slurm sends SIGUSR1 up to 30 s before the requested 80 s ahead of the limit
    #    (its timer runs every 30 s), i.e. 10-40 s after the start of this 2-minute job
    job = submit(cluster, save, LONG_ITERS, "--time=2", "--signal=USR1@80", data=data)
    info = cluster.wait_done(job, JOB_TIMEOUT)
    text = output(save, job)
    assert_completed(info, text)  # exited by itself, before the limit
    ends.append((job, exit_iteration(text, "SIGUSR1")))
    assert tracker(save) == ends[-1][1]

    # 2. the same command resumes (in a longer allocation, so that the time limit's warning does not come
    #    first); `scancel --signal=USR1` (to the job's steps, as Slurm's warning)
    job = submit(cluster, save, LONG_ITERS, "--time=6", "--signal=USR1@80", data=data)
    wait_for_iteration(cluster, job, save, ends[-1][1] + 3)
    cluster.cmd("scancel", "--signal=USR1", str(job))
    info = cluster.wait_done(job, JOB_TIMEOUT)
    text = output(save, job)
    assert_completed(info, text)
    assert logged_iterations(text)[0] == ends[-1][1] + 1  # resumed from the checkpoint, not from scratch
    ends.append((job, exit_iteration(text, "SIGUSR1")))
    assert tracker(save) == ends[-1][1]

    # 3. plain scancel: SIGTERM to every process of the job, SIGKILL after KillWait
    job = submit(cluster, save, LONG_ITERS, "--time=6", "--signal=USR1@80", data=data)
    wait_for_iteration(cluster, job, save, ends[-1][1] + 3)
    cluster.cmd("scancel", str(job))
    info = cluster.wait_done(job, JOB_TIMEOUT)
    text = output(save, job)
    assert info["JobState"] == "CANCELLED", info
    assert logged_iterations(text)[0] == ends[-1][1] + 1
    ends.append((job, exit_iteration(text, "SIGTERM")))
    assert tracker(save) == ends[-1][1]

    # the same command without interruption, stopped at the last exit iteration by --exit-interval
    last = ends[-1][1]
    ref = tmp_path / "uninterrupted"
    job = submit(cluster, ref, LONG_ITERS, data=data, EXTRA_ARGS=f"{TINY['EXTRA_ARGS']} --exit-interval {last}")
    assert_completed(cluster.wait_done(job, JOB_TIMEOUT), output(ref, job))
    want, got = losses(os.path.join(ref, "metrics.jsonl")), losses(os.path.join(save, "metrics.jsonl"))
    assert sorted(want) == sorted(got) == list(range(1, last + 1)), (ends, sorted(got))
    assert [got[i] for i in range(1, last + 1)] == [want[i] for i in range(1, last + 1)], ends  # bit-exact


def test_requeue_restarts_the_job_and_it_resumes_by_itself(slurm_cluster, corpus, reference, tmp_path):
    cluster, save = slurm_cluster, tmp_path / "run"
    job = submit(
        cluster,
        save,
        ITERS,
        "--requeue",
        data=dict(DATA_PATH=corpus["DATA_PATH"], TOKENIZER_MODEL=corpus["TOKENIZER_MODEL"]),
    )
    wait_for_iteration(cluster, job, save, 3)
    cluster.cmd("scontrol", "requeue", str(job))
    info = cluster.wait_done(job, JOB_TIMEOUT + CRED_EXPIRE_S)  # a requeued job waits before it starts again
    text = output(save, job)  # --open-mode=append: both runs of the job
    assert_completed(info, text)
    assert info["Restarts"] == "1", info
    stop = exit_iteration(text, "SIGTERM")
    assert "(restart 1)" in text and f"loaded checkpoint of iteration {stop}" in text, text[-3000:]
    its = logged_iterations(text)
    assert its == list(range(1, stop + 1)) + list(range(stop + 1, ITERS + 1)), its
    got = losses(os.path.join(save, "metrics.jsonl"))
    assert [got[i] for i in range(1, ITERS + 1)] == [reference["losses"][i] for i in range(1, ITERS + 1)]


def test_two_nodes_rendezvous_on_the_first_node(slurm_cluster, corpus, reference, tmp_path):
    """Two slurmd on this host are two nodes: --nodes=2 with one rank per node meets at the first host of
    SLURM_JOB_NODELIST and trains DP2 exactly like one node with two ranks."""
    cluster, save = slurm_cluster, tmp_path / "run"
    if len(cluster.nodes) < 2:
        pytest.skip("only one node name resolves to this host (need its hostname and localhost)")
    job = submit(
        cluster,
        save,
        ITERS,
        "--nodes=2",
        NPROC_PER_NODE="1",
        data=dict(DATA_PATH=corpus["DATA_PATH"], TOKENIZER_MODEL=corpus["TOKENIZER_MODEL"]),
    )
    info = cluster.wait_done(job, JOB_TIMEOUT)
    text = output(save, job)
    assert_completed(info, text)
    first = cluster.cmd("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()[0]
    assert f"2 node(s) x 1 ranks, rendezvous {first}:" in text, text[:3000]
    assert "world 2 = TP 1 x PP 1 x DP 2" in text
    got = losses(os.path.join(save, "metrics.jsonl"))
    assert [got[i] for i in range(1, ITERS + 1)] == [reference["losses"][i] for i in range(1, ITERS + 1)]
