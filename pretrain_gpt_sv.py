#!/usr/bin/env python3
"""Pre-train a GPT with scale vectors (docs/method.md) on Megatron-Core. Megatron-LM's flag names; see
`python pretrain_gpt_sv.py --help` and examples/pretrain_gpt_sv.sh. Launch with torchrun or srun."""

import os
import sys

# nothing is compiled here; a large compile-thread pool only costs start-up time
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

if __name__ == "__main__":  # the async checkpoint writer spawns processes that re-import this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from megatron_sv.training import main

    sys.exit(main())
