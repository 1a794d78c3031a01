"""How pretrain_gpt_sv.py ends: its exit codes and the one-line report of a bad input.

Its own module so that the command line (cli.py), the loop (loop.py) and the launcher (launch.py) share
them without importing each other; torch-free."""

from __future__ import annotations

import os
import sys

EXIT_OK, EXIT_BAD_ARGS, EXIT_DIVERGED = 0, 2, 3


def launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun: RANK; srun without torchrun: SLURM_PROCID)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def report_bad_args(error: Exception) -> int:
    """One line on rank 0 (every rank finds the same error), then the usage-error exit code."""
    if launch_rank() == 0:
        print(f"pretrain_gpt_sv.py: error: {error}", file=sys.stderr, flush=True)
    return EXIT_BAD_ARGS
