"""torchrun as the launch scripts run it: ``python -m megatron_sv.launch <torchrun arguments>``.

Plain torchrun (``python -m torch.distributed.run``) with two differences that matter on a cluster:

* The exit signals, SIGUSR1 (Slurm's warning before the time limit, ``#SBATCH --signal=USR1@120``,
  ``scancel --signal=USR1``) and SIGTERM (``scancel``, the time limit, ``scontrol requeue``), are for the
  training ranks: each rank saves a checkpoint and exits. torchrun itself would die of SIGUSR1, and on SIGTERM
  it stops the ranks with SIGKILL after 30 s, cutting a longer exit save short. So the agent holds both
  signals blocked, and the ranks inherit the blocked mask through fork and exec: a signal that arrives while
  a rank is still importing stays pending until the rank's handler takes it (megatron_sv.training.signals),
  instead of being lost or killing it. A thread of the agent waits for the signals and passes each one on to
  the ranks, also to ranks that start later (a signal that came during the rendezvous): outside Slurm,
  ``kill -USR1 <agent>`` or ``kill <agent>`` is enough. Under Slurm every process of the step is signalled
  anyway; a rank that gets a signal twice acts once. The agent then simply waits for the ranks to finish
  their exit save (the cluster's KillWait bounds it; SIGKILL still ends everything). A rank started with
  --no-exit-signal-handler keeps both signals blocked: only SIGKILL stops it.
* A rank that fails first with one of the trainer's own exit codes (2: a bad argument, a refused checkpoint;
  3: training diverged) has already printed a one-line error. Then the agent exits with that code and adds
  no ChildFailedError report after it (nor its line about the ranks it stopped), so the error is the last
  line of the log. Any other failure (a crash, a rank killed by a signal) keeps torchrun's full report and
  its exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import List, Optional, Sequence

from megatron_sv.training.exits import EXIT_BAD_ARGS, EXIT_DIVERGED  # torch-free

# The trainer's exit codes after which its own message says everything.
REPORTED_EXIT_CODES = (EXIT_BAD_ARGS, EXIT_DIVERGED)
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _children() -> List[int]:
    """The agent's worker processes: its direct children (torchrun starts each rank with Popen)."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may contain spaces; the parent pid is the 2nd field after its ")"
        if stat[stat.rindex(")") + 2 :].split()[1] == me:
            pids.append(int(entry))
    return pids


def _forward_signals(signals: Sequence[int], poll_s: float = 0.5) -> None:
    """Wait for ``signals`` (blocked in every thread) and send each one to the worker processes; while no
    worker runs yet, keep it until the first one has started."""
    pending: List[int] = []
    sent_to: dict = {}

    def loop():
        while True:
            pending.append(signal.sigwait(set(signals)))
            while pending:
                workers = _children()
                if workers:
                    for sig in pending:
                        for pid in workers:
                            if sent_to.get((sig, pid)):
                                continue  # each worker hears each kind of signal once
                            try:
                                os.kill(pid, sig)
                                sent_to[(sig, pid)] = True
                            except ProcessLookupError:
                                pass
                    pending.clear()
                else:
                    time.sleep(poll_s)

    threading.Thread(target=loop, name="megatron_sv-signal-forwarder", daemon=True).start()


class _HoldFailureLines(logging.Filter):
    """Holds back torchrun's lines about a failed rank ("failed (exitcode: N) ...") and about the ranks it
    stops after it ("Sending process ... closing signal ..."): dropped when the failure is one the rank
    reported itself, logged just before torchrun's report otherwise."""

    HELD = ("failed (exitcode:", "Sending process")

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.held, self.releasing = logger, [], False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.releasing or not str(record.msg).startswith(self.HELD):
            return True
        self.held.append(record)
        return False

    def release(self) -> None:
        self.releasing = True
        for record in self.held:
            self.logger.handle(record)
        self.held.clear()


def main(argv: Optional[Sequence[str]] = None) -> int:
    # before torch starts any thread: every thread inherits the mask, so only the forwarder takes the signal
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    _forward_signals(FORWARDED_SIGNALS)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415 - torch after the signal mask: its threads inherit it
    from torch.distributed.run import parse_args, run  # noqa: PLC0415 - as above

    api_logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    held = _HoldFailureLines(api_logger)
    api_logger.addFilter(held)
    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as e:
        # the first rank to fail is the cause; torchrun then stops the others (SIGTERM) before they exit
        first = e.get_first_failure()[1]
        if first.exitcode in REPORTED_EXIT_CODES:
            return first.exitcode
        held.release()
        raise
    except BaseException:
        held.release()
        raise
    held.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
