# Shared settings for the tpu/ scripts. Source it; every value can be overridden from the environment
# (or put overrides in tpu/config.env, which is git-ignored).
set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$TPU_DIR/.." && pwd)"
# shellcheck disable=SC1091
[ -f "$TPU_DIR/config.env" ] && source "$TPU_DIR/config.env"

GCLOUD="${GCLOUD:-gcloud}"
TPU_NAME="${TPU_NAME:-agentlm}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$("$GCLOUD" config get-value project 2>/dev/null || true)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
REMOTE_DIR="${REMOTE_DIR:-agentlm-jax}"   # relative to each worker's home directory

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
