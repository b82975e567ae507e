#!/usr/bin/env bash
# N trainer processes on this machine, joined through jax.distributed on 127.0.0.1 (gloo
# collectives on CPU): multi-host behaviour (sharded batches, one writer, preemption
# agreed by all hosts, resume) without a cluster.
#
#   launch/local.sh -n 2 -- --config experiments/nin_fashion_mnist.py --workdir /tmp/run
#
# Options (before --):
#   -n N                   processes (default 2)
#   --devices-per-process D  CPU devices each process gets (default 1; XLA's
#                          --xla_force_host_platform_device_count)
#   --port P               coordinator port on 127.0.0.1 (default: a free one)
#   --logdir DIR           process_<i>.log and process_<i>.pid (default: <workdir>.logs,
#                          or ./local_logs when the workdir is a URL)
# Process 0's output is also shown here. SIGTERM or Ctrl-C is forwarded to every process
# (each saves a checkpoint); the exit status is the worst of the processes'.
set -euo pipefail

usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }
die() { echo "local.sh: error: $*" >&2; exit 2; }

num=2 devices=1 port="" logdir=""
while (($#)); do
  case "$1" in
    -n) num="${2:?-n needs a number}"; shift 2 ;;
    --devices-per-process) devices="${2:?--devices-per-process needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --logdir) logdir="${2:?--logdir needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (training arguments go after --); see --help" ;;
  esac
done
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$devices'"
(($#)) || die "give the training arguments after --, e.g. -- --config experiments/nin_fashion_mnist.py --workdir DIR"

python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z "$logdir" ]]; then
  workdir=""
  for ((i = 1; i <= $#; i++)); do
    arg="${!i}"
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      --workdir) j=$((i + 1)); workdir="${!j:-}" ;;
    esac
  done
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then logdir="${workdir%/}.logs"; else logdir="local_logs"; fi
fi
mkdir -p "$logdir"

pids=()
# shellcheck disable=SC2329  # Called by the traps below.
forward() {  # Every process gets the signal; each saves its checkpoint and exits 128+signal.
  echo "local.sh: forwarding SIG$1 to ${#pids[@]} processes" >&2
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# shellcheck disable=SC2001  # A regex; ${var//} has only globs.
xla_flags=$(sed 's/--xla_force_host_platform_device_count=[0-9]*//g' <<<"${XLA_FLAGS:-}")
cd "$(dirname "$0")/.."
for ((i = 0; i < num; i++)); do
  log="$logdir/process_$i.log"
  # Each process in its own session: a Ctrl-C reaches them once, through forward().
  XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices" \
    setsid "$python" -m nin_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$num" \
    --process_id="$i" "$@" >"$log" 2>&1 </dev/null &
  pids+=("$!")
  echo "$!" >"$logdir/process_$i.pid"
done
echo "local.sh: $num processes (pids ${pids[*]}), coordinator 127.0.0.1:$port, logs in $logdir/" >&2
tail -n +1 -F "$logdir/process_0.log" 2>/dev/null &
tailer=$!

worst=0
for ((i = 0; i < num; i++)); do
  # `wait` returns early (>128) when a trapped signal arrives: wait again until the process ends.
  while true; do
    status=0
    wait "${pids[$i]}" || status=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  echo "local.sh: process $i exited with $status" >&2
  if ((status > worst)); then worst=$status; fi
done
sleep 0.2  # Let tail print process 0's last lines.
kill "$tailer" 2>/dev/null || true
exit "$worst"
