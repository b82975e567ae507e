#!/usr/bin/env bash
# nin_jax on Cloud TPU VMs: one host or a pod slice; on-demand, spot, or queued with
# automatic resume. Every remote command runs on ALL workers of the slice (a pod's hosts
# must all start the trainer, or the first waits for the others forever).
#
#   launch/tpu.sh create  --name N --zone Z --type v4-32 [--spot]
#   launch/tpu.sh setup   --name N --zone Z            # copy this checkout, install the venv
#   launch/tpu.sh train   --name N --zone Z -- --config experiments/nin_imagenet.py --workdir gs://B/run
#   launch/tpu.sh logs    --name N --zone Z [--worker K|all] [--follow] [--lines L] [--workdir gs://B/run]
#   launch/tpu.sh stop    --name N --zone Z [--grace S]   # SIGTERM (checkpoint), SIGKILL after S s
#   launch/tpu.sh status  --name N --zone Z
#   launch/tpu.sh delete  --name N --zone Z            # the queued resource with its TPU, or the TPU
#   launch/tpu.sh queue   --name N --zone Z --type v5litepod-16 [--spot | --best-effort]
#   launch/tpu.sh babysit --name N --zone Z --type T [--spot] [--max-retries R] [--poll S] [--keep] -- TRAIN ARGS
#
# queue and babysit also take --valid-until-duration D (e.g. 6h: give up waiting for capacity)
# and --labels K=V,... . babysit deletes the queued resource and its TPU when the run completes
# or it gives up (--keep keeps them). logs --workdir reads the copies that every worker makes
# in <workdir>/logs/ (every 60 s and at exit): what is left after a preempted VM's disk is gone.
# Flags for every command: --project P (default: gcloud's configured project), --version V
# (runtime; default per TPU generation, below), --dry-run or DRY_RUN=1 (print every command,
# one per line, exactly as it would run; run nothing).
# Everything after -- goes unchanged to `python -m nin_jax.main --distributed` on every worker.
set -euo pipefail

say() { echo "tpu.sh: $*" >&2; }
die() { echo "tpu.sh: error: $*" >&2; exit 2; }  # A usage error: nothing was started.
fail() { echo "tpu.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,25s/^# \{0,1\}//p' "$0"; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
# Paths on the workers, expanded there (hence the quotes here).
# shellcheck disable=SC2088
REMOTE_DIR='~/nin_jax' REMOTE_VENV='~/nin_jax_venv' REMOTE_LOG='~/nin_jax_train.log' REMOTE_PID='~/nin_jax_train.pid'
# shellcheck disable=SC2088
REMOTE_EXIT='~/nin_jax_train.exit' REMOTE_ARGS='~/nin_jax_train.args'
# The trainer's exit codes that mean "fix the command or the data" (errors.UserError and its
# kinds): babysit stops on them instead of spending retries on a run that cannot succeed.
USER_ERROR_CODES="2 3 4"

# Runtime version per TPU generation: the "PyTorch and JAX" table of Cloud TPU's "TPU software
# versions" page (cloud.google.com/tpu/docs/runtimes, read 2026-11). A v5e slice on a v4 image
# (or the reverse) is the classic failure; the old `v2-alpha` default fits none of today's.
default_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for TPU type '$1'; pass --version (see cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

# ----------------------------------------------------------------------------- arguments

COMMAND="${1:-}"
case "$COMMAND" in
  create|setup|train|logs|stop|status|delete|queue|babysit) shift ;;
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$COMMAND'; one of: create setup train logs stop status delete queue babysit" ;;
esac
NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 BEST_EFFORT=0 DRY_RUN="${DRY_RUN:-0}" KEEP=0
WORKER=0 FOLLOW=0 LINES=200 GRACE=120 MAX_RETRIES=10 POLL=60 VALID_UNTIL="" LABELS="" LOG_WORKDIR=""
while (($#)); do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --worker) WORKER="${2:?--worker needs a number or all}"; shift 2 ;;
    --lines) LINES="${2:?--lines needs a number}"; shift 2 ;;
    --grace) GRACE="${2:?--grace needs seconds}"; shift 2 ;;
    --max-retries) MAX_RETRIES="${2:?--max-retries needs a number}"; shift 2 ;;
    --poll) POLL="${2:?--poll needs seconds}"; shift 2 ;;
    --valid-until-duration) VALID_UNTIL="${2:?--valid-until-duration needs a duration, e.g. 6h}"; shift 2 ;;
    --labels) LABELS="${2:?--labels needs KEY=VALUE,...}"; shift 2 ;;
    --workdir) LOG_WORKDIR="${2:?--workdir needs gs://BUCKET/run}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --spot) SPOT=1; shift ;;
    --best-effort) BEST_EFFORT=1; shift ;;
    --follow) FOLLOW=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) die "unknown flag '$1' (training arguments go after --); see: launch/tpu.sh --help" ;;
  esac
done
TRAIN_ARGS=("$@")
[[ -n "$NAME" ]] || die "give the TPU's name: --name NAME"
[[ -n "$ZONE" ]] || die "give the zone: --zone ZONE (e.g. us-central2-b for v4)"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker takes a worker number or 'all', got '$WORKER'"
for number in LINES GRACE MAX_RETRIES POLL; do
  [[ "${!number}" =~ ^[0-9]+$ ]] || die "--$(tr '[:upper:]_' '[:lower:]-' <<<"$number") takes a number, got '${!number}'"
done
((SPOT && BEST_EFFORT)) && die "--spot and --best-effort are two kinds of capacity; choose one"
need_type() {
  [[ -n "$TYPE" ]] || die "give the accelerator type: --type (e.g. v4-8, v4-32, v5litepod-16, v6e-8)"
  [[ -n "$VERSION" ]] || VERSION="$(default_version "$TYPE")"
}
need_train_args() {
  ((${#TRAIN_ARGS[@]})) || die "give the training arguments after --, e.g. -- --config experiments/nin_imagenet.py --workdir gs://BUCKET/run"
}

# ----------------------------------------------------------------------------- running commands

# Prints a command exactly as it would run (shell-quoted), or runs it.
run() {
  if ((DRY_RUN)); then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")

# A script run by bash on the given workers (K or all). --quiet: never prompt (a prompt per
# worker is how --worker=all hangs); ConnectTimeout: an unreachable worker fails, not waits.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --quiet \
    --ssh-flag=-oConnectTimeout=30 --command="$2"
}

# gcloud's ssh key with a passphrase and no agent: --worker=all would ask once per worker, at once.
check_ssh_key() {
  local key="$HOME/.ssh/google_compute_engine"
  ((DRY_RUN)) || [[ ! -f "$key" ]] && return 0  # Without a key, gcloud --quiet makes one without passphrase.
  ssh-keygen -y -P "" -f "$key" >/dev/null 2>&1 && return 0
  ssh-add -l >/dev/null 2>&1 && return 0
  die "$key has a passphrase and no ssh-agent holds it, so ssh to all workers would hang at once on prompts; run: eval \"\$(ssh-agent)\" && ssh-add $key"
}

quoted() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }

# ----------------------------------------------------------------------------- remote scripts

# The sudo a TPU VM gives its user, where there is one: /dev/accel* and libtpu's lockfile may
# belong to another user (root), whose processes lsof shows only to root.
# shellcheck disable=SC2016
REMOTE_SUDO='sudo=$(command -v sudo >/dev/null 2>&1 && echo "sudo -n" || true)'

# Refuses to start while something else holds the TPU on this worker. The same run already
# training is not an error: starting it again leaves it alone (see remote_start).
remote_check_free() {
  cat <<EOF
$REMOTE_SUDO
pid=\$(cat $REMOTE_PID 2>/dev/null || true)
if [ -n "\$pid" ] && kill -0 "\$pid" 2>/dev/null; then
  if [ "\$(cat $REMOTE_ARGS 2>/dev/null)" = $(quoted "$(quoted "${TRAIN_ARGS[@]}")") ]; then
    echo "worker \$(hostname): already training these arguments (pid \$pid)"; exit 0
  fi
  echo "worker \$(hostname): a run with other arguments (pid \$pid) still holds the TPU; run: launch/tpu.sh stop --name $NAME --zone $ZONE" >&2; exit 3
fi
held=\$(\$sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr '\n' ' ')
if [ -n "\$held" ]; then
  echo "worker \$(hostname): processes \$held hold the TPU; run: launch/tpu.sh stop --name $NAME --zone $ZONE" >&2; exit 3
fi
EOF
}

# Starts the trainer detached from ssh (setsid, nohup; launch/tpu_worker.sh records its exit
# status and copies its log to the bucket). Idempotent: gcloud runs this script again when ssh
# drops (exit 255), so under a lock a trainer that already runs is left alone, never doubled.
remote_start() {
  cat <<EOF
set -e
cd $REMOTE_DIR
$REMOTE_SUDO
exec 9>>~/nin_jax_train.lock
flock 9
pid=\$(cat $REMOTE_PID 2>/dev/null || true)
if [ -n "\$pid" ] && kill -0 "\$pid" 2>/dev/null; then echo "worker \$(hostname): already training, pid \$pid"; exit 0; fi
\$sudo rm -f "\${TPU_LOCKFILE:-/tmp/libtpu_lockfile}"  # A crashed run's; nothing holds the TPU (checked).
rm -f $REMOTE_PID $REMOTE_EXIT
echo $(quoted "$(quoted "${TRAIN_ARGS[@]}")") >$REMOTE_ARGS
echo "=== \$(date -u '+%F %T') start: $(quoted "${TRAIN_ARGS[@]}")" >>$REMOTE_LOG
JAX_PLATFORMS=tpu nohup setsid bash $REMOTE_DIR/launch/tpu_worker.sh $REMOTE_VENV/bin/python $REMOTE_LOG $REMOTE_PID $REMOTE_EXIT -- $(quoted "${TRAIN_ARGS[@]}") >>$REMOTE_LOG 2>&1 </dev/null 9>&- &
for _ in \$(seq 100); do [ -s $REMOTE_PID ] && break; sleep 0.1; done
echo "worker \$(hostname): training, pid \$(cat $REMOTE_PID), log $REMOTE_LOG"
EOF
}

# One line per worker: the trainer runs, exited with a status, or was never started here.
remote_trainer_status() {
  cat <<EOF
pid=\$(cat $REMOTE_PID 2>/dev/null || true)
if [ -n "\$pid" ] && kill -0 "\$pid" 2>/dev/null; then echo "trainer: running"
elif [ -f $REMOTE_EXIT ]; then echo "trainer: exited \$(cat $REMOTE_EXIT)"
else echo "trainer: not started"; fi
EOF
}

# SIGTERM (the trainer saves a checkpoint and exits 143), SIGKILL after the grace period, then
# whatever else of ours still runs, and the lockfile libtpu leaves behind.
remote_stop() {
  cat <<EOF
pid=\$(cat $REMOTE_PID 2>/dev/null || true)
if [ -n "\$pid" ] && kill -0 "\$pid" 2>/dev/null; then
  kill -TERM "\$pid"
  echo "worker \$(hostname): SIGTERM to \$pid; waiting up to $GRACE s for its checkpoint"
  for _ in \$(seq $GRACE); do kill -0 "\$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "\$pid" 2>/dev/null; then kill -KILL "\$pid"; echo "worker \$(hostname): still running after $GRACE s: SIGKILL"; fi
fi
pkill -KILL -f "\$HOME/nin_jax_venv/bin/python -m nin_jax[.]main" || true
$REMOTE_SUDO
\$sudo rm -f "\${TPU_LOCKFILE:-/tmp/libtpu_lockfile}"
rm -f $REMOTE_PID
echo "worker \$(hostname): stopped, TPU free"
EOF
}

remote_status() {
  cat <<EOF
pid=\$(cat $REMOTE_PID 2>/dev/null || true)
if [ -n "\$pid" ] && kill -0 "\$pid" 2>/dev/null; then state="training (pid \$pid)"; else state="not training"; fi
echo "worker \$(hostname): \$state; last log line: \$(tail -n 1 $REMOTE_LOG 2>/dev/null)"
EOF
}

# ----------------------------------------------------------------------------- commands

cmd_create() {
  need_type
  local spot=()
  ((SPOT)) && spot=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE" \
    --version="$VERSION" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  check_ssh_key
  local jax_version commit state bundle sha attempt
  jax_version="$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$REPO/requirements.txt")"
  [[ -n "$jax_version" ]] || die "$REPO/requirements.txt pins no jax==VERSION"
  commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no commit")"
  state="$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo "with uncommitted changes" || echo "clean")"
  say "setup: copying $REPO at $commit ($state: the files as they are on disk, untracked ones too, git-ignored ones not) to every worker of $NAME"
  bundle="${TMPDIR:-/tmp}/nin_jax_$NAME.tgz"
  if ((DRY_RUN)); then
    echo "git -C $(quoted "$REPO") ls-files -z --cached --others --exclude-standard | tar -C $(quoted "$REPO") --null -T - -czf $(quoted "$bundle")"
    sha="SHA256_OF_THE_BUNDLE"
  else
    git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar -C "$REPO" --null -T - -czf "$bundle"
    sha="$(sha256sum "$bundle" | cut -d' ' -f1)"
  fi
  for attempt in 1 2 3; do  # scp to many workers drops now and then: copy, then prove it arrived.
    if run gcloud compute tpus tpu-vm scp "$bundle" "$NAME:nin_jax.tgz" "${LOCATION[@]}" --worker=all --quiet &&
       on_workers all "echo '$sha  nin_jax.tgz' | sha256sum --check --quiet"; then
      break
    fi
    ((attempt < 3)) || die "the code did not arrive intact on every worker after 3 tries; check the workers with: launch/tpu.sh status --name $NAME --zone $ZONE"
    say "setup: copy $attempt of 3 failed; retrying in $((attempt * 10)) s"
    sleep $((attempt * 10))
  done
  on_workers all "set -e
rm -rf $REMOTE_DIR.new && mkdir $REMOTE_DIR.new && tar -xzf nin_jax.tgz -C $REMOTE_DIR.new
rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR
export PATH=\"\$HOME/.local/bin:\$PATH\"
command -v uv >/dev/null || python3 -m pip install --user --quiet uv
uv venv --quiet --allow-existing --python 3.11 $REMOTE_VENV
uv pip install --quiet --python $REMOTE_VENV/bin/python -r $REMOTE_DIR/requirements.txt 'jax[tpu]==$jax_version'
echo \"worker \$(hostname): ready, jax $jax_version\""
}

# The --workdir among the training arguments.
train_workdir() {
  local arg workdir=""
  for arg in "${TRAIN_ARGS[@]}"; do
    if [[ "$workdir" == next ]]; then workdir="$arg"; fi
    if [[ "$arg" == --workdir ]]; then workdir=next; fi
    if [[ "$arg" == --workdir=* ]]; then workdir="${arg#--workdir=}"; fi
  done
  echo "$workdir"
}

cmd_train() {
  need_train_args
  check_ssh_key
  local workdir
  workdir="$(train_workdir)"
  [[ "$workdir" == gs://* ]] || say "warning: --workdir '$workdir' is not on gs://: the hosts of a pod slice share no disk, and a TPU VM's disk goes with the VM"
  on_workers all "$(remote_check_free)"  # Every worker first: a partial start would hang the others.
  on_workers all "$(remote_start)"
  say "train: started on every worker of $NAME; follow it with: launch/tpu.sh logs --name $NAME --zone $ZONE --follow"
}

cmd_logs() {
  local follow="tail -n $LINES" prefix="" log
  if [[ -n "$LOG_WORKDIR" ]]; then  # The bucket's copies: also after the VM and its disk are gone.
    [[ "$LOG_WORKDIR" == gs://* ]] || die "logs --workdir reads the copies in a gs:// workdir, not '$LOG_WORKDIR'"
    if ((DRY_RUN)); then
      run gcloud storage ls "${LOG_WORKDIR%/}/logs/"
      run gcloud storage cat "${LOG_WORKDIR%/}/logs/WORKER.log"
      return
    fi
    for log in $(gcloud storage ls "${LOG_WORKDIR%/}/logs/"); do
      gcloud storage cat "$log" | tail -n "$LINES" | sed "s|^|[$(basename "$log" .log)] |"
    done
    return
  fi
  ((FOLLOW)) && follow="tail -n $LINES -F"
  [[ "$WORKER" == all ]] && prefix=" | sed -u \"s/^/[\$(hostname)] /\""
  check_ssh_key
  on_workers "$WORKER" "$follow $REMOTE_LOG$prefix"
}

cmd_stop() { check_ssh_key; on_workers all "$(remote_stop)"; }

# A queued resource is deleted with its node (--force); a TPU made by `create` has none.
cmd_delete() {
  if ((DRY_RUN)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
    return
  fi
  local state
  state="$(qr_state)" || fail "could not tell whether $NAME is a queued resource: $(gcloud_said)"
  if [[ "$state" != NOT_FOUND ]]; then
    gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

cmd_status() {
  local state
  state="$(run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)')"
  if ((DRY_RUN)); then echo "$state"; state=READY; else say "status: $NAME is $state"; fi
  if [[ "$state" == READY ]]; then check_ssh_key; on_workers all "$(remote_status)"; fi
}

cmd_queue() {
  need_type
  local track=() capacity=() policy=()
  ((SPOT)) && capacity=(--spot)
  ((BEST_EFFORT)) && track=(alpha) && capacity=(--best-effort)  # --best-effort exists in alpha only.
  [[ -n "$VALID_UNTIL" ]] && policy+=(--valid-until-duration="$VALID_UNTIL")
  [[ -n "$LABELS" ]] && policy+=(--labels="$LABELS")
  run gcloud ${track[@]+"${track[@]}"} compute tpus queued-resources create "$NAME" --node-id="$NAME" \
    "${LOCATION[@]}" --accelerator-type="$TYPE" --runtime-version="$VERSION" ${capacity[@]+"${capacity[@]}"} \
    ${policy[@]+"${policy[@]}"}
}

# ----------------------------------------------------------------------------- babysit

GCLOUD_ERROR="${TMPDIR:-/tmp}/tpu.sh.$$.err"
trap 'rm -f "$GCLOUD_ERROR"' EXIT

# The queued resource's state (one of the TPU API's QueuedResourceState values), NOT_FOUND
# when gcloud says so, or a failure (status 1, gcloud's message in $GCLOUD_ERROR): an expired
# token or a network error says nothing about the TPU and must not be taken for its absence.
qr_state() {
  local state
  if state="$(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
                --format='value(state.state)' 2>"$GCLOUD_ERROR")"; then
    echo "$state"
  elif grep -q "NOT_FOUND" "$GCLOUD_ERROR"; then
    echo NOT_FOUND
  else
    return 1
  fi
}

gcloud_said() { grep -m1 "ERROR" "$GCLOUD_ERROR" 2>/dev/null || echo "no message"; }

# Keeps a queued (spot or best-effort) TPU training until the run's final.json is in its gs://
# workdir, as a state machine over the queued resource's real states: waits while it is
# created, provisioned, suspended or deleted; deletes and queues it again when it is SUSPENDED
# (a preemption) or FAILED; on ACTIVE sets the node up once and starts training, then reads
# the trainer's exit status on the workers: a preemption (143), a crash or a lost worker
# restarts it (one retry each), a user error (exit 2-4) stops babysit. gcloud errors are
# retried with a growing pause and spend no retry. At the end, or on giving up, it deletes the
# queued resource and its TPU unless --keep.
cmd_babysit() {
  need_type
  need_train_args
  local workdir final retries=0 errors=0 state last="" node_ready=0 requeued=0 statuses rc
  workdir="$(train_workdir)"
  [[ "$workdir" == gs://* ]] || die "babysit needs --workdir gs://...: a recreated TPU starts with an empty disk, and only a bucket keeps the checkpoints"
  final="${workdir%/}/final.json"
  if ((DRY_RUN)); then  # One recovery cycle, as it would run.
    run gcloud storage ls "$final"
    run gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" --format='value(state.state)'
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
    cmd_queue; cmd_setup; cmd_train
    on_workers all "$(remote_trainer_status)"
    return
  fi
  again() {  # Another command of this script, in its own process: its errors end it, not babysit.
    local flags=(--name "$NAME" --zone "$ZONE" --type "$TYPE" --version "$VERSION")
    [[ -n "$PROJECT" ]] && flags+=(--project "$PROJECT")
    ((SPOT)) && flags+=(--spot)
    ((BEST_EFFORT)) && flags+=(--best-effort)
    [[ -n "$VALID_UNTIL" ]] && flags+=(--valid-until-duration "$VALID_UNTIL")
    [[ -n "$LABELS" ]] && flags+=(--labels "$LABELS")
    bash "$0" "$1" "${flags[@]}" "${@:2}"
  }
  release() {  # The cost guard: a TPU left behind bills until someone notices.
    if ((KEEP)); then say "babysit: --keep: the queued resource $NAME and its TPU are left running"; return; fi
    say "babysit: deleting the queued resource $NAME and its TPU (--keep keeps them)"
    gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet ||
      say "babysit: error: deleting $NAME failed; it may still bill: run launch/tpu.sh delete --name $NAME --zone $ZONE"
  }
  retry() {
    retries=$((retries + 1))
    if ((retries > MAX_RETRIES)); then
      release
      fail "babysit: $1, and all $MAX_RETRIES retries are used; the checkpoints in $workdir are kept: see launch/tpu.sh logs --workdir $workdir, then run babysit again to go on"
    fi
    say "babysit: $1; retry $retries of $MAX_RETRIES"
  }
  backoff() {  # A gcloud error: wait longer each time (POLL x 2, 4, ... up to 10 min); no retry spent.
    errors=$((errors + 1))
    local wait=$((POLL * (1 << (errors < 5 ? errors : 5))))
    ((wait <= 600)) || wait=600
    say "babysit: $1 failed ($(gcloud_said)); trying again in $wait s"
    sleep "$wait"
  }
  while true; do
    if gcloud storage ls "$final" >/dev/null 2>"$GCLOUD_ERROR"; then
      say "babysit: $final exists: the run is complete"
      release
      return 0
    elif ! grep -q "matched no objects" "$GCLOUD_ERROR"; then
      backoff "looking for $final"; continue
    fi
    if ! state="$(qr_state)"; then backoff "describing $NAME"; continue; fi
    errors=0
    [[ "$state" != "$last" ]] && say "babysit: $NAME is $state"
    last="$state"
    case "$state" in
      ACTIVE)
        requeued=0
        if ((!node_ready)); then  # A new node: its disk is empty.
          if again setup && again train -- "${TRAIN_ARGS[@]}"; then node_ready=1; else retry "setting up or starting $NAME failed"; sleep "$POLL"; fi
          continue
        fi
        rc=0
        statuses="$(on_workers all "$(remote_trainer_status)")" || rc=$?
        if ((rc == 255)); then
          retry "a worker of $NAME did not answer over ssh (a lost host)"
        elif ! grep -qv "trainer: running" <<<"$statuses"; then
          sleep "$POLL"; continue
        elif ! grep -v "trainer: exited 0" <<<"$statuses" | grep -q trainer; then
          sleep "$POLL"; continue  # Finished everywhere: final.json is being written.
        else
          local code
          for code in $USER_ERROR_CODES; do
            if grep -q "trainer: exited $code\$" <<<"$statuses"; then
              release
              fail "babysit: the trainer exited with status $code on $NAME, an error to fix in the command or the data, not a preemption; see launch/tpu.sh logs --workdir $workdir (no retry)"
            fi
          done
          if grep -q "trainer: exited 143\$" <<<"$statuses"; then  # SIGTERM: often the node going away.
            sleep "$POLL"
            state="$(qr_state)" || state=unknown
            [[ "$state" != ACTIVE ]] && continue  # A suspension: the loop spends its one retry there.
          fi
          retry "training on $NAME stopped ($(grep -o 'trainer: .*' <<<"$statuses" | sort | uniq -c | xargs))"
        fi
        # Every worker's trainer stops before any starts again: the survivors of a crash would
        # otherwise hold the TPU (and block the free check) until JAX's heartbeat times out.
        again stop --grace 30 || true
        again train -- "${TRAIN_ARGS[@]}" || { node_ready=0; sleep "$POLL"; } ;;
      SUSPENDED|FAILED)
        # One retry per loss, however many gcloud errors its delete and queue meet; a new
        # request that fails again is a new loss.
        if ((!requeued)); then retry "$NAME is $state"; requeued=1; fi
        if gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet 2>"$GCLOUD_ERROR"; then
          if again queue 2>"$GCLOUD_ERROR"; then requeued=0; else backoff "queueing $NAME"; fi
        else
          backoff "deleting $NAME"
        fi
        node_ready=0 ;;
      NOT_FOUND)
        node_ready=0
        if again queue 2>"$GCLOUD_ERROR"; then requeued=0
        elif ! grep -q ALREADY_EXISTS "$GCLOUD_ERROR"; then backoff "queueing $NAME"; fi ;;
      CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|SUSPENDING|DELETING) sleep "$POLL" ;;
      *) say "babysit: $NAME is in a state this script does not know ('$state'); looking again in $POLL s"; sleep "$POLL" ;;
    esac
  done
}

"cmd_$COMMAND"
