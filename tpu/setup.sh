#!/usr/bin/env bash
# Copy this checkout (its committed files) to every worker and install it there in ~/agentlm-jax/.venv
# with the TPU and GCP extras. Run again after each change you want on the slice.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

archive="$(mktemp -d)/agentlm-jax.tar.gz"
git -C "$REPO_DIR" archive --format=tar.gz -o "$archive" HEAD
echo "Copying $(git -C "$REPO_DIR" rev-parse --short HEAD) to all workers of $TPU_NAME"
copy_to_all_workers "$archive" agentlm-jax.tar.gz   # relative to the home directory
# On each worker. pyproject needs Python >= 3.11, but Ubuntu 22.04 TPU images (tpu-ubuntu2204-base) ship
# 3.10: then uv (pip --user, or its installer) builds the venv on a uv-managed CPython $PYTHON_VERSION.
# A venv whose Python is too old (e.g. left by an earlier failed setup) is rebuilt; a good one is kept.
remote_setup="set -e
mkdir -p ~/$REMOTE_DIR && tar -xzf ~/agentlm-jax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
new_enough() { \"\$1\" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if ! new_enough .venv/bin/python; then
  rm -rf .venv
  if new_enough python3; then
    python3 -m venv .venv
  else
    export PATH=\$HOME/.local/bin:\$PATH
    command -v uv >/dev/null || python3 -m pip install --user --quiet uv \\
      || curl -LsSf https://astral.sh/uv/install.sh | sh
    uv venv --python $PYTHON_VERSION --seed .venv
  fi
fi
.venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e '.[tpu,gcp]'
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
on_all_workers "$remote_setup"
