# Sourced by the launch scripts (examples/pretrain_gpt_sv.sh, examples/paper_scales/pretrain_paper_scale.sh):
# start pretrain_gpt_sv.py on this machine or on every node of a Slurm job.
#
#   launch_training NPROC_PER_NODE ARG...
#
# Outside Slurm: one torchrun on this machine (MASTER_PORT, default 29517).
# Inside a Slurm job (SLURM_JOB_ID set): `srun --ntasks-per-node=1` starts one torchrun per node; they meet
# at the job's first node (scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) on MASTER_PORT (default
# 20000 + job id mod 10000) with the c10d rendezvous, so any number of nodes works without further settings.
# torchrun is started through `python -m megatron_sv.launch`: SIGUSR1 and SIGTERM go to the ranks, which save
# and exit (the agent neither dies of them nor kills the ranks during the exit save), and a rank's one-line
# error (bad argument, refused checkpoint) ends the log and sets the exit code.
# Signals under Slurm (--signal=USR1@N, scancel [--signal=USR1], the time limit, scontrol requeue): Slurm
# signals every process of the training step; the ranks save a checkpoint and exit. The batch shell, which
# also gets SIGTERM at the time limit / on scancel / on requeue, keeps waiting for the step to finish, so the
# job ends only after the exit save (within the cluster's KillWait).
# DRY_RUN=1 prints the command instead of running it. Needs PYTHON set and the repository as the current
# directory.

launch_training() {
  local nproc="$1"; shift
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    local cmd=("$PYTHON" -m megatron_sv.launch --nproc-per-node "$nproc" --master-addr 127.0.0.1
               --master-port "${MASTER_PORT:-29517}" pretrain_gpt_sv.py "$@")
    echo "+ ${cmd[*]}"
    [ "${DRY_RUN:-0}" = 1 ] && return 0
    "${cmd[@]}"
    return
  fi

  local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
  # a port per job (outside Linux's ephemeral range 32768-60999): jobs sharing a node do not collide, and a
  # requeued job finds its port free again
  local master_addr master_port="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}"
  master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  echo "Slurm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $nproc ranks," \
       "rendezvous $master_addr:$master_port"
  # \$SLURM_NODEID is expanded by each node's task
  local cmd="exec $(printf '%q' "$PYTHON") -m megatron_sv.launch --nnodes $nnodes --nproc-per-node $nproc \
--node-rank \$SLURM_NODEID --rdzv-backend c10d --rdzv-endpoint $master_addr:$master_port \
--rdzv-id $SLURM_JOB_ID pretrain_gpt_sv.py $(printf '%q ' "$@")"
  echo "+ srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \"$cmd\""
  [ "${DRY_RUN:-0}" = 1 ] && return 0

  trap 'echo "launch: the batch shell got SIGTERM; waiting for the training step to save and exit" >&2' TERM
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$cmd" &
  local pid=$! rc=0
  # `wait` also returns when a trapped signal arrives; a finished srun is reaped (kill -0 then fails), an
  # interrupted wait leaves it alive (or a zombie) and we wait again for its real exit status.
  while kill -0 "$pid" 2>/dev/null; do
    if wait "$pid"; then rc=0; else rc=$?; fi
  done
  trap - TERM
  return "$rc"
}
