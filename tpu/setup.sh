#!/usr/bin/env bash
# Copy this checkout (its committed files) to every worker and install it there in ~/agentlm-jax/.venv
# with the TPU and GCP extras. Run again after each change you want on the slice.
source "$(dirname "$0")/common.sh"

archive="$(mktemp -d)/agentlm-jax.tar.gz"
git -C "$REPO_DIR" archive --format=tar.gz -o "$archive" HEAD
echo "Copying $(git -C "$REPO_DIR" rev-parse --short HEAD) to all workers of $TPU_NAME"
"$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/agentlm-jax.tar.gz" --project="$PROJECT" \
  --zone="$ZONE" --worker=all
on_all_workers "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/agentlm-jax.tar.gz -C ~/$REMOTE_DIR \
  && cd ~/$REMOTE_DIR && (test -x .venv/bin/python || python3 -m venv .venv) \
  && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e '.[tpu,gcp]' \
  && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
