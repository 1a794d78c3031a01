"""pretrain_gpt_sv.py's command line: parse and validate every flag, then hand over to the training loop.

Nothing here imports torch or megatron.core: ``--help``, usage errors and failed validations answer in a
fraction of a second and without Megatron-Core's Transformer Engine/Apex warnings. The heavy imports
start with ``megatron_sv.training.loop``, once the flags are known to be good.
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from megatron_sv.training.arguments import ArgumentError, launch_rank, parse_args, validate_args

EXIT_OK, EXIT_BAD_ARGS, EXIT_DIVERGED = 0, 2, 3


def report_bad_args(error: Exception) -> int:
    """One line on rank 0 (every rank finds the same error), then the usage-error exit code."""
    if launch_rank() == 0:
        print(f"pretrain_gpt_sv.py: error: {error}", file=sys.stderr, flush=True)
    return EXIT_BAD_ARGS


def main(argv: Optional[List[str]] = None) -> int:
    start = time.time()
    args = parse_args(argv)  # --help and usage errors exit here
    args._start_time = start
    try:
        validate_args(args)
    except ArgumentError as e:
        return report_bad_args(e)
    from megatron_sv.training.loop import run

    return run(args)
