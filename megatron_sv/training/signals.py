"""Exit cleanly on SIGTERM (preemption, scancel, torchrun shutdown), SIGUSR1 (Slurm's warning before
the time limit, ``#SBATCH --signal=USR1@120``) and SIGINT (Ctrl-C): save a checkpoint at the next safe
point (the end of an iteration; all ranks agree through one all-reduce) and exit.

Slurm, ``scancel`` and ``kill -TERM -<pgid>`` signal *every* process of the job, not only the ranks:
the checkpoint writer's helper processes too (Megatron-Core's dist-checkpoint writer forks file
writers, starts a multiprocessing Manager whose queue collects their results, and forks one process
per async save). A helper killed mid-save breaks the save (BrokenPipeError, ConnectionRefusedError)
and, with async saves, the finalization of earlier pending checkpoints as well.

So the ranks *block* the exit signals in their main thread, before any thread or helper process
exists: a signal mask is inherited by every thread and process started afterwards (fork, and exec
too), so helpers never die of these signals; they stay pending. The training loop polls the
pending set at its safe point (``received``). A Python handler is installed as well, for a signal
that reaches a thread that does not block it. A second signal during the exit save merges with the
first (it stays pending) and cannot interrupt the save.

A launcher may start the ranks with a signal already blocked (megatron_sv.launch holds SIGUSR1 blocked so
that Slurm's warning during start-up is kept, not lost): it stays pending and the first poll sees it.

One wrinkle: multiprocessing's resource tracker, when it starts, unblocks SIGINT and SIGTERM in the
calling thread (CPython bpo-33613). It is therefore started here, while the signals are blocked (so
it inherits the block too), and the block is applied again afterwards.
"""

from __future__ import annotations

import signal
from multiprocessing import resource_tracker
from typing import Dict, Optional, Sequence

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class ExitSignalHandler:
    def __init__(self, signals: Sequence[int] = EXIT_SIGNALS):
        self.signals = tuple(signals)
        self._received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._installed = False

    def _handle(self, signum, frame):
        if self._received is None:
            self._received = signum

    def install(self) -> "ExitSignalHandler":
        """Call in the main thread, before threads or helper processes are started."""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self._installed = True
        return self

    @property
    def received(self) -> Optional[int]:
        """The first exit signal received (delivered to the handler, or pending), else None."""
        if self._received is None and self._installed:
            pending = [s for s in self.signals if s in signal.sigpending()]
            if pending:
                self._received = pending[0]
        return self._received

    def restore(self) -> None:
        """Restore the previous handlers. The signals stay blocked and pending ones are discarded: a late
        duplicate (Slurm signals every process, the launcher forwards the signal too) must not kill the
        process on its way out."""
        if self._installed:
            while signal.sigtimedwait(self.signals, 0) is not None:
                pass
            self._installed = False
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        received = self.received
        return signal.Signals(received).name if received else ""
