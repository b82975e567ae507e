#!/usr/bin/env bash
# Runs on each TPU worker, started detached by `launch/tpu.sh train`: the trainer, its exit
# status (what `babysit` reads to tell a preemption from a user error), and copies of its log
# in the run's bucket, every NIN_JAX_LOG_COPY_SECONDS (60) and at exit, because a preempted
# VM's disk is deleted with it.
#
#   tpu_worker.sh PYTHON LOG PIDFILE EXITFILE -- TRAIN ARGS
set -uo pipefail
python="$1" log="$2" pidfile="$3" exitfile="$4"
shift 5
workdir="" previous=""
for arg in "$@"; do
  [[ "$previous" == --workdir ]] && workdir="$arg"
  [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"
  previous="$arg"
done
copy_log() {
  [[ "$workdir" == gs://* ]] || return 0
  gcloud storage cp "$log" "${workdir%/}/logs/$(hostname).log" --quiet >/dev/null 2>&1 || true
}

"$python" -m nin_jax.main --distributed "$@" &
child=$!
echo "$child" >"$pidfile"
(while kill -0 "$child" 2>/dev/null; do sleep "${NIN_JAX_LOG_COPY_SECONDS:-60}"; copy_log; done) &
copier=$!
wait "$child"
status=$?
echo "$status" >"$exitfile"
kill "$copier" 2>/dev/null
echo "=== $(date -u '+%F %T') the trainer exited with status $status"
copy_log
exit "$status"
