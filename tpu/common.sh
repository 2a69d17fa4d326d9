# shellcheck shell=bash
# Shared settings for the tpu/ scripts. Source it. Each setting comes from, in this order: the environment
# (a non-empty value), tpu/config.env (git-ignored; plain VAR=value lines, see config.env.example), the
# default below.
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by setup.sh
REPO_DIR="$(cd "$TPU_DIR/.." && pwd)"
TPU_SETTINGS="GCLOUD GCLOUD_TRACK TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION REMOTE_DIR PYTHON_VERSION
TPU_ENV NODE_COUNT STOP_GRACE_S WAIT_POLL_S"

# config.env may assign any setting; the ones the environment gives are put back afterwards, so they win.
if [ -f "$TPU_DIR/config.env" ]; then
  _from_env=""
  for _var in $TPU_SETTINGS; do
    if [ -n "${!_var:-}" ]; then _from_env="$_from_env $_var"; printf -v "_env_$_var" '%s' "${!_var}"; fi
  done
  # shellcheck disable=SC1091
  source "$TPU_DIR/config.env"
  for _var in $_from_env; do _saved="_env_$_var"; printf -v "$_var" '%s' "${!_saved}"; done
fi

GCLOUD="${GCLOUD:-gcloud}"
GCLOUD_TRACK="${GCLOUD_TRACK:-}"           # alpha or beta: gcloud alpha compute tpus ... (e.g. for --reservation)
TPU_NAME="${TPU_NAME:-agentlm}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$("$GCLOUD" config get-value project 2>/dev/null || true)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
REMOTE_DIR="${REMOTE_DIR:-agentlm-jax}"   # relative to each worker's home directory
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"   # the venv's Python where the image's python3 is older than 3.11
TPU_ENV="${TPU_ENV:-}"                     # names of local environment variables run.sh forwards to every worker
NODE_COUNT="${NODE_COUNT:-1}"              # slices of a multislice queued resource (1: a single slice)
STOP_GRACE_S="${STOP_GRACE_S:-300}"        # how long run.sh --stop waits for the trainer's checkpoint and exit
QUEUED_RESOURCE="$TPU_NAME-qr"

# The TPU VM software image that matches each TPU generation (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "unknown accelerator type '$1': set RUNTIME_VERSION" >&2; return 1 ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"

if [ -z "$PROJECT" ]; then
  echo "No Google Cloud project: set PROJECT=... or run 'gcloud config set project ...'" >&2
  exit 2
fi
case "$GCLOUD_TRACK" in
  ''|alpha|beta) ;;
  *) echo "GCLOUD_TRACK must be empty, alpha or beta, not '$GCLOUD_TRACK'" >&2; exit 2 ;;
esac
case "$NODE_COUNT" in
  ''|*[!0-9]*|0) echo "NODE_COUNT must be a positive whole number of slices, not '$NODE_COUNT'" >&2; exit 2 ;;
esac
case "$STOP_GRACE_S" in
  ''|*[!0-9]*) echo "STOP_GRACE_S must be a whole number of seconds, not '$STOP_GRACE_S'" >&2; exit 2 ;;
esac

# gcloud [alpha|beta] compute tpus ARGS...
tpus() {
  "$GCLOUD" ${GCLOUD_TRACK:+"$GCLOUD_TRACK"} compute tpus "$@"
}

# Run one command on every worker of the slice at once; on a multislice queued resource (NODE_COUNT > 1), on every
# worker of every slice.
on_all_workers() {
  if [ "$NODE_COUNT" -gt 1 ]; then
    tpus queued-resources ssh "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" \
      --node=all --worker=all --command="$1"
  else
    tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="$1"
  fi
}

# Copy one local file to every worker; the destination is relative to the home directory there.
copy_to_all_workers() {
  if [ "$NODE_COUNT" -gt 1 ]; then
    tpus queued-resources scp "$1" "$QUEUED_RESOURCE:$2" --project="$PROJECT" --zone="$ZONE" \
      --node=all --worker=all
  else
    tpus tpu-vm scp "$1" "$TPU_NAME:$2" --project="$PROJECT" --zone="$ZONE" --worker=all
  fi
}
