#!/usr/bin/env bash
# Check megatron_sv on the newest supported megatron-core, which needs Python 3.12 (the CI covers
# Python 3.11 with megatron-core 0.16.1): build a Python 3.12 virtual environment with the tested torch
# and megatron-core, install this package into it, and run the parallel-parity subset of the tests
# (CPU, 2 gloo ranks). Result and duration: docs/versions.md.
#
#   bash tools/check_versions.sh                 # venv in ${TMPDIR:-/tmp}/megatron_sv-py312, reused
#   VENV=/path MEGATRON_CORE=0.19.2 TORCH=2.13.0 PYTHON312=/path/to/python3.12 bash tools/check_versions.sh
#
# PyPI's Linux torch wheels are CUDA builds: importing them needs the nvidia-* runtime wheels (pulled in
# as dependencies, about 4 GB), even on a CPU-only machine. The tests still run on the CPU path: no GPU
# is visible (CUDA_VISIBLE_DEVICES=""), so megatron_sv selects gloo and its CPU adapter.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=${TORCH:-2.13.0}
MEGATRON_CORE=${MEGATRON_CORE:-0.19.2}
VENV=${VENV:-${TMPDIR:-/tmp}/megatron_sv-py312}
if [[ -z "${PYTHON312:-}" ]]; then
    PYTHON312=$(command -v python3.12 || true)
    if [[ -z "$PYTHON312" ]] && command -v pyenv > /dev/null; then
        PYTHON312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2> /dev/null | tail -n 1 || true)
    fi
fi
if [[ -z "$PYTHON312" || ! -x "$PYTHON312" ]]; then
    echo "check_versions.sh: error: no Python 3.12 found; install one (e.g. pyenv install 3.12) or set PYTHON312" >&2
    exit 2
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON312" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "== installing torch $TORCH, megatron-core $MEGATRON_CORE and megatron_sv[dev] into $VENV"
# (pip's notes about local index folders that lack a package are noise here)
pip install --quiet "torch==$TORCH" "megatron-core==$MEGATRON_CORE" 2> >(grep -v "is ignored" >&2)
pip install --quiet -e ".[dev]" 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" - << 'PY'
import sys, importlib.metadata as md
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| megatron-core", md.version("megatron-core"),
      "| cuda available:", torch.cuda.is_available())
PY
installed=$(date +%s)

# The parallel-parity subset: TP/PP/DP/EP and checkpoint resharding against one rank, the CPU adapter's
# patches, and every strategy's losses and replicated-vector gradients across layouts.
tests=(
    tests/platform/test_cpu_adapter.py
    tests/platform/test_parity.py
    tests/scale_vectors/test_parallel_equivalence.py
    tests/scale_vectors/test_checkpoint_resharding.py
)
echo "== pytest ${tests[*]}"
set +e
# a longer per-test limit than the suite's 300 s: this check often runs on a busy machine
CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout 900 \
    "${tests[@]}" "$@"
rc=$?
set -e
end=$(date +%s)
echo "== check_versions.sh: pytest exit $rc; install $((installed - start)) s, tests $((end - installed)) s, total $((end - start)) s"
exit $rc
