"""pretrain_gpt_sv.py's command line: parse and validate every flag, then hand over to the training loop.

Nothing here imports torch or megatron.core: ``--help``, usage errors and failed validations answer in a
fraction of a second and without Megatron-Core's Transformer Engine/Apex warnings. The heavy imports
start with ``megatron_sv.training.loop``, once the flags are known to be good.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional

from megatron_sv.training.arguments import ArgumentError, parse_args, validate_args
from megatron_sv.training.exits import EXIT_BAD_ARGS, EXIT_DIVERGED, EXIT_OK, report_bad_args

__all__ = ["EXIT_BAD_ARGS", "EXIT_DIVERGED", "EXIT_OK", "main"]


def main(argv: Optional[List[str]] = None) -> int:
    start = time.time()
    args = parse_args(argv)  # --help and usage errors exit here
    try:
        config = dataclasses.replace(validate_args(args), start_time=start)
    except ArgumentError as e:
        return report_bad_args(e)
    # lazy: torch and megatron.core load only once the flags are known to be good (see the docstring)
    from megatron_sv.training.loop import run  # noqa: PLC0415

    return run(config)
