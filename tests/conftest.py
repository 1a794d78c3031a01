import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402

# DNP's fused inner norms run through torch.compile by default. Compiling costs start-up time in every
# process that builds a DNP model, so the suite runs their eager kernels (the same math) unless a test
# asks for compiled ones (tests/scale_vectors/test_inner_norms.py checks that both agree).
os.environ.setdefault("MEGATRON_SV_FUSED_KERNELS", "eager")


from tests.helpers.processes import SESSION, TAG_VAR, kill_tagged, reap_registered  # noqa: E402

# every process the suite starts (directly or not) inherits the session tag; jobs get tags below it
os.environ[TAG_VAR] = SESSION


_SESSION_PID = os.getpid()


def _terminated(signum, frame):
    """SIGTERM (a cancelled CI job, tests/run_all.sh stopping its groups) ends the session like Ctrl-C, so
    that teardown and pytest_sessionfinish still reap what the tests started (ranks in sessions of their
    own, orphaned helpers), instead of leaving them running. A forked child of the session (a
    multiprocessing.Pool worker, which Pool.terminate() stops with SIGTERM) inherits this handler: there it
    dies of the signal as it would without it."""
    if os.getpid() != _SESSION_PID:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _terminated)


@pytest.fixture(autouse=True)
def _reap_jobs():
    """Kill the background jobs a test started (tests/training/cli.start), also when it failed."""
    yield
    reap_registered()


def pytest_sessionfinish(session, exitstatus):
    """Nothing the suite started outlives it (orphaned checkpoint-writer helpers included)."""
    kill_tagged(SESSION)


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Megatron-Core parallel state on one in-process rank (gloo on CPU, NCCL on a GPU), TP=PP=EP=1."""
    from megatron_sv.platform import destroy_distributed, initialize_distributed
    from tests.helpers.distributed import find_free_port

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    initialize_distributed(seed=1234)
    yield
    destroy_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
