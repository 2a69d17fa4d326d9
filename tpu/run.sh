#!/usr/bin/env bash
# Run one command on every worker of the slice at once (what multi-host JAX needs), in the installed checkout.
#   tpu/run.sh [--env NAME]... COMMAND...     # in the background; each start logs to its own
#                                             # ~/agentlm-jax/logs/run-<UTC time>.log, ~/agentlm-jax/run.log
#                                             # links to the latest
#   tpu/run.sh --foreground [--env NAME]... COMMAND...   # stream every worker's output here (and to the log)
#   tpu/run.sh --status        # per worker: the trainer's processes, the TPU's holders, the log's last line
#   tpu/run.sh --stop          # SIGTERM to the trainer (it saves a checkpoint), then wait up to STOP_GRACE_S
#   tpu/run.sh --kill          # SIGKILL to the trainer: nothing is saved (for one that --stop did not end)
#   tpu/run.sh --holders       # the processes holding the TPU (/dev/accel*, /dev/vfio/*): "TPU in use" errors
#   tpu/run.sh --kill-holders  # SIGTERM to those, SIGKILL after 30 s: frees the TPU whoever holds it
# --env NAME (repeatable) and TPU_ENV="NAME ..." (environment or tpu/config.env) forward those variables of
# this shell to every worker, e.g. TPU_ENV="HF_TOKEN XLA_FLAGS LIBTPU_INIT_ARGS". Their values are copied in a
# file (scp), never on a command line or in a log, and the file is deleted once the command has read it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,14p' "$0"; }

# The trainer's command line (python -m agentlm_jax.train ...), nothing else. The [a] keeps the pattern from
# matching itself in the remote shell that runs pkill; export and generate don't match.
TRAINER_PATTERN='[a]gentlm_jax[.]train( |$)'
# What libtpu opens: /dev/accel* on v4 (and older), /dev/vfio/<group> on v5e, v5p and v6e. Older libtpu
# releases also refuse to start while /tmp/libtpu_lockfile exists, which a crashed process leaves behind
# (jax-ml/jax#10192). The remote commands take both from TPU_DEVICE_FILES / TPU_LOCKFILE if set (the tests do).
TPU_DEVICE_FILES='/dev/accel* /dev/vfio/[0-9]*'
TPU_LOCKFILE='/tmp/libtpu_lockfile'

foreground=0
action=""
env_names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --foreground) foreground=1 ;;
    --env) [ $# -ge 2 ] || { echo "--env needs a variable name: --env HF_TOKEN" >&2; exit 2; }
           env_names+=("$2"); shift ;;
    --env=*) env_names+=("${1#--env=}") ;;
    --stop|--kill|--status|--holders|--kill-holders)
      [ $# -eq 1 ] || { echo "$1 takes no other arguments" >&2; exit 2; }
      action="${1#--}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "unknown option: $1 (see --help; the command's own options go after it)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done

# On the worker: the PIDs of the processes holding the TPU's device files (lsof, else fuser; through sudo
# where it is allowed without a password, so other users' processes show too).
remote_holders="holders() {
  devs=\$(ls -d \${TPU_DEVICE_FILES:-$TPU_DEVICE_FILES} 2>/dev/null) || true
  [ -n \"\$devs\" ] || return 0
  { sudo -n lsof -t \$devs 2>/dev/null || lsof -t \$devs 2>/dev/null || sudo -n fuser \$devs 2>/dev/null \\
    || fuser \$devs 2>/dev/null; } | tr -s ' \\t' '\\n' | grep -E '^[0-9]+\$' | sort -un
}
show() { [ -n \"\$1\" ] && ps -o pid=,user=,etime=,args= -p \"\$(echo \$1 | tr ' ' ,)\" | sed \"s/^/\$(hostname):   /\"; }
lockfile=\${TPU_LOCKFILE:-$TPU_LOCKFILE}
stale_lock() { [ -e \"\$lockfile\" ] && echo \"\$(hostname): \$lockfile is left from a process that did not exit cleanly\" \\
  \"(older libtpu releases refuse to start while it exists; tpu/run.sh --kill-holders removes it)\"; true; }"

case "$action" in
  stop)
    # Saving the 7B train state can take minutes (docs/tpu_vms.md, "Preemption"): wait for it, say if it lasts.
    on_all_workers "if ! pkill -TERM -f '$TRAINER_PATTERN'; then echo \"\$(hostname): no trainer running\"; exit 0; fi
echo \"\$(hostname): SIGTERM sent; waiting up to ${STOP_GRACE_S}s for the trainer to save and exit\"
deadline=\$((\$(date +%s) + $STOP_GRACE_S))
while pgrep -f '$TRAINER_PATTERN' >/dev/null; do
  if [ \$(date +%s) -ge \$deadline ]; then
    echo \"\$(hostname): the trainer is still running after ${STOP_GRACE_S}s: wait (tpu/run.sh --status), or end it\" \\
         \"without saving: tpu/run.sh --kill\"
    exit 1
  fi
  sleep 1
done
echo \"\$(hostname): the trainer has exited\""
    exit $? ;;
  kill)
    on_all_workers "$remote_holders
if ! pkill -KILL -f '$TRAINER_PATTERN'; then echo \"\$(hostname): no trainer running\"; else
  echo \"\$(hostname): SIGKILL sent to the trainer\"; sleep 2; fi
pids=\$(holders)
if [ -n \"\$pids\" ]; then echo \"\$(hostname): the TPU is still held by (tpu/run.sh --kill-holders ends them):\"
  show \"\$pids\"; fi"
    exit $? ;;
  holders)
    on_all_workers "$remote_holders
pids=\$(holders)
if [ -z \"\$pids\" ]; then echo \"\$(hostname): the TPU is free\"; stale_lock; else echo \"\$(hostname): the TPU is held by:\"
  show \"\$pids\"; fi"
    exit $? ;;
  kill-holders)
    on_all_workers "$remote_holders
unlock() { if [ -e \"\$lockfile\" ]; then sudo -n rm -f \"\$lockfile\" 2>/dev/null || rm -f \"\$lockfile\"
  echo \"\$(hostname): removed the stale \$lockfile\"; fi; }
pids=\$(holders)
if [ -z \"\$pids\" ]; then unlock; echo \"\$(hostname): the TPU is free\"; exit 0; fi
echo \"\$(hostname): SIGTERM to the processes holding the TPU:\"; show \"\$pids\"
sudo -n kill -TERM \$pids 2>/dev/null || kill -TERM \$pids
for _ in \$(seq 30); do pids=\$(holders); [ -n \"\$pids\" ] || break; sleep 1; done
if [ -n \"\$pids\" ]; then echo \"\$(hostname): SIGKILL to the ones left:\"; show \"\$pids\"
  sudo -n kill -KILL \$pids 2>/dev/null || kill -KILL \$pids; sleep 1; fi
pids=\$(holders)
if [ -z \"\$pids\" ]; then unlock; echo \"\$(hostname): the TPU is free\"; else echo \"\$(hostname): still held by\" \\
  \"(other users' processes need sudo):\"; show \"\$pids\"; exit 1; fi"
    exit $? ;;
  status)
    on_all_workers "$remote_holders
trainer=\$(pgrep -f '$TRAINER_PATTERN' | tr '\\n' ' ')
if [ -n \"\$trainer\" ]; then echo \"\$(hostname): trainer running:\"; show \"\$trainer\"
else echo \"\$(hostname): no trainer running\"; fi
pids=\$(holders)
if [ -n \"\$pids\" ]; then echo \"\$(hostname): the TPU is held by:\"; show \"\$pids\"
else echo \"\$(hostname): the TPU is free\"; stale_lock; fi
log=~/$REMOTE_DIR/run.log
if [ -e \"\$log\" ]; then echo \"\$(hostname): \$(readlink -f \"\$log\"): \$(tail -n 1 \"\$log\" | tr '\\r' '\\n' | tail -n 1)\"; fi"
    exit $? ;;
esac

if [ $# -eq 0 ]; then
  if [ ${#env_names[@]} -gt 0 ] || [ "$foreground" = 1 ]; then echo "no command given (see --help)" >&2; exit 2; fi
  usage
  exit 0
fi

# The variables to forward: --env names must be set here; TPU_ENV names that are not are skipped, with a note.
forward=()
add_name() {
  local name="$1" required="$2" have
  if ! [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "'$name' is not an environment variable name (--env and TPU_ENV take names; the values come from" \
         "this shell: export $name=... first)" >&2
    exit 2
  fi
  for have in "${forward[@]+"${forward[@]}"}"; do [ "$have" = "$name" ] && return 0; done
  if [ -z "${!name+set}" ]; then
    if [ "$required" = 1 ]; then echo "--env $name: $name is not set in this shell; export it first" >&2; exit 2; fi
    echo "not forwarding $name (named in TPU_ENV, not set in this shell)" >&2
    return 0
  fi
  forward+=("$name")
}
for name in ${TPU_ENV//,/ }; do add_name "$name" 0; done
for name in "${env_names[@]+"${env_names[@]}"}"; do add_name "$name" 1; done

env_file="$REMOTE_DIR/.run-env"   # on each worker, relative to the home directory
load_env="rm -f ~/$env_file"
if [ ${#forward[@]} -gt 0 ]; then
  local_env="$(mktemp)"   # mode 0600
  trap 'rm -f "$local_env"' EXIT
  for name in "${forward[@]}"; do
    value="${!name}"
    # POSIX single quotes: nothing inside is expanded; a ' is written as '\''.
    printf "export %s='%s'\n" "$name" "${value//\'/\'\\\'\'}" >> "$local_env"
  done
  echo "Forwarding to every worker: ${forward[*]} (values not shown)"
  copy_to_all_workers "$local_env" "$env_file"
  load_env=". ~/$env_file && rm -f ~/$env_file"
fi

quoted="$(printf '%q ' "$@")"
cmd="cd ~/$REMOTE_DIR && export PATH=\$HOME/$REMOTE_DIR/.venv/bin:\$PATH && $load_env"
# Each start gets its own log, so a restart (after a crash or a preemption) keeps the previous one.
cmd="$cmd && mkdir -p logs && log=logs/run-\$(date -u +%Y%m%dT%H%M%SZ).log && ln -sfn \"\$log\" run.log"
cmd="$cmd && echo \"# \$(date -u '+%F %T UTC') on \$(hostname)${forward[*]:+, forwarded: ${forward[*]}}\" >> \"\$log\""
if [ "$foreground" = 1 ]; then
  on_all_workers "set -o pipefail; $cmd && $quoted 2>&1 | tee -a \"\$log\""
else
  on_all_workers "$cmd && (nohup $quoted < /dev/null >> \"\$log\" 2>&1 &) && echo \"started on \$(hostname), log ~/$REMOTE_DIR/\$log\""
  first="$TPU_NAME"
  if [ "$NODE_COUNT" -gt 1 ]; then first="$TPU_NAME-0"; fi   # the first slice of a multislice
  echo "Follow worker 0 with: $GCLOUD ${GCLOUD_TRACK:+$GCLOUD_TRACK }compute tpus tpu-vm ssh $first --zone=$ZONE --worker=0" \
       "--command='tail -F ~/$REMOTE_DIR/run.log'   (or: tpu/run.sh --status)"
fi
