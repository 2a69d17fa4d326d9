#!/usr/bin/env bash
# Delete the TPU VM or slice (and its queued resource, if it was created with --queued). Billing stops here.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

if tpus queued-resources describe "$TPU_NAME-qr" --project="$PROJECT" --zone="$ZONE" \
    >/dev/null 2>&1; then
  tpus queued-resources delete "$TPU_NAME-qr" --project="$PROJECT" --zone="$ZONE" \
    --force --quiet
else
  tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
