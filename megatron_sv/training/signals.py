"""Exit on SIGTERM (preemption, scancel, torchrun shutdown) and SIGUSR1 (Slurm's warning before the
time limit, ``#SBATCH --signal=USR1@120``): the handler only records the signal; the training loop
checks it once per iteration, all ranks agree through one all-reduce, save a checkpoint and exit."""

from __future__ import annotations

import signal
from typing import Dict, Optional, Sequence

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    def __init__(self, signals: Sequence[int] = EXIT_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._previous_mask = None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def install(self) -> "ExitSignalHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        # A launcher may start the ranks with these signals blocked (megatron_sv.launch holds SIGUSR1 blocked
        # so that a warning during start-up is kept pending, not lost): from here on they are handled.
        self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def restore(self) -> None:
        # block again first (as the launcher had it), so that a late duplicate of the signal (Slurm signals
        # every process, the launcher forwards it as well) stays pending instead of killing the process
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
