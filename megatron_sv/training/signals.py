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

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def install(self) -> "ExitSignalHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
