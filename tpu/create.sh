#!/usr/bin/env bash
# Create a TPU VM or pod slice.
#   tpu/create.sh                 # on-demand, created now or failing if there is no capacity
#   tpu/create.sh --queued        # a queued resource: waits in Google's queue until capacity is free
#   tpu/create.sh --spot          # spot (preemptible) capacity; the trainer checkpoints on SIGTERM
# Settings (environment or tpu/config.env): TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (e.g. v4-32,
# v5litepod-16, v5p-64, v6e-8), RUNTIME_VERSION (derived from ACCELERATOR_TYPE when unset).
source "$(dirname "$0")/common.sh"

queued=0
spot=()
for arg in "$@"; do
  case "$arg" in
    --queued) queued=1 ;;
    --spot) spot=(--spot) ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

echo "Creating $ACCELERATOR_TYPE '$TPU_NAME' in $ZONE (project $PROJECT, image $RUNTIME_VERSION)"
if [ "$queued" = 1 ]; then
  "$GCLOUD" compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
  echo "Queued. Watch it with: $GCLOUD compute tpus queued-resources describe $TPU_NAME-qr --zone=$ZONE"
else
  "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
fi
