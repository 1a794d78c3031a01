#!/usr/bin/env bash
# The test command (README, .ci/run): each test group in its own pytest process, SV_TEST_JOBS (default 2) of
# them at a time. Extra pytest arguments are passed to every group.
#
# A process per group: in-process tests share Megatron-Core's global parallel state and torch's compile
# caches; in one long process a group run late in the session saw state left by earlier groups
# (order-dependent failures in tests/scale_vectors and tests/te_backend that pass in a fresh process).
#
# Several at a time: much of the suite leaves a core idle (single-rank reference runs and one-rank CLI jobs
# run one thread, OMP_NUM_THREADS=1; Slurm jobs wait for the scheduler's timers; jobs spend seconds in
# start-up), so two groups side by side keep both cores of a 2-core machine busy. The slowest units start
# first so that the lanes end together. A unit is a group folder or one slow file of it (then the folder's
# unit leaves that file out). Each unit's output is printed when it ends, with its wall time; a summary
# follows. SV_TEST_JOBS=1 runs the units one after another.
set -u
cd "$(dirname "$0")/.."
jobs=${SV_TEST_JOBS:-2}

# slowest first (measured on 2 cores); groups not named here follow in name order
slow_first=(
  tests/slurm/
  tests/scale_vectors/test_parallel_equivalence.py
  tests/training/
  tests/fp8/
  tests/conversion/
  tests/scale_vectors/
)
units=()
for u in "${slow_first[@]}"; do [ -e "$u" ] && units+=("$u"); done
for g in tests/test_docs.py tests/*/; do
  case "$g" in tests/helpers/ | tests/__pycache__/) continue ;; esac
  [[ " ${units[*]} " == *" $g "* ]] || units+=("$g")
done

# the pytest arguments of a unit: a folder leaves out its files that are units of their own
unit_args() {
  local u=$1 other
  printf '%s\n' "$u"
  if [ -d "$u" ]; then
    for other in "${units[@]}"; do
      if [ "$other" != "$u" ] && [[ "$other" == "$u"* ]]; then printf '%s\n' "--ignore=$other"; fi
    done
  fi
}

logs=$(mktemp -d)
declare -A unit_of=() started=()
rc=0
summary=()

# job control: each unit runs in a process group of its own; on an interrupt, SIGTERM to each group ends the
# pytest sessions as Ctrl-C does (tests/conftest.py), and their teardown reaps what the tests started
set -m
stop_all() {
  local pid
  for pid in "${!unit_of[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  wait
  rm -rf "$logs"
  exit 130
}
trap stop_all INT TERM

start_unit() {
  local u=$1 log
  log="$logs/$(echo "$u" | tr '/' '_').log"
  mapfile -t args < <(unit_args "$u")
  python -m pytest -q "${args[@]}" "${@:2}" >"$log" 2>&1 &
  unit_of[$!]=$u
  started[$!]=$SECONDS
}

finish_one() {
  local pid r u log
  wait -n -p pid
  r=$?
  u=${unit_of[$pid]}
  log="$logs/$(echo "$u" | tr '/' '_').log"
  echo "== $u ($((SECONDS - started[$pid])) s, exit $r)"
  cat "$log"
  # 5 = no tests collected (e.g. a group skipped entirely on this machine): not a failure
  if [ "$r" -ne 0 ] && [ "$r" -ne 5 ]; then rc=1; fi
  summary+=("$(printf '%5d s  exit %-3s %s' "$((SECONDS - started[$pid]))" "$r" "$u")")
  unset "unit_of[$pid]"
}

for u in "${units[@]}"; do
  while [ "${#unit_of[@]}" -ge "$jobs" ]; do finish_one; done
  start_unit "$u" "$@"
done
while [ "${#unit_of[@]}" -gt 0 ]; do finish_one; done
rm -rf "$logs"

echo "== summary ($SECONDS s in all, $jobs at a time)"
printf '%s\n' "${summary[@]}"
exit $rc
