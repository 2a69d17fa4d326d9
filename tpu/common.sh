# Shared settings for the tpu/ scripts. Source it. Each setting comes from, in this order: the environment
# (a non-empty value), tpu/config.env (git-ignored; plain VAR=value lines, see config.env.example), the
# default below.
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$TPU_DIR/.." && pwd)"
TPU_SETTINGS="GCLOUD TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION REMOTE_DIR PYTHON_VERSION"

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
TPU_NAME="${TPU_NAME:-agentlm}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$("$GCLOUD" config get-value project 2>/dev/null || true)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
REMOTE_DIR="${REMOTE_DIR:-agentlm-jax}"   # relative to each worker's home directory
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"   # the venv's Python where the image's python3 is older than 3.11

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

# gcloud compute tpus tpu-vm ssh on every worker of the slice at once.
on_all_workers() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command="$1"
}
