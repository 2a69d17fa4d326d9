#!/usr/bin/env bash
# Create a TPU VM or pod slice.
#   tpu/create.sh                         # on-demand, created now or failing if there is no capacity
#   tpu/create.sh --queued [--wait]       # a queued resource: waits in Google's queue until capacity is free;
#                                         # --wait polls it here until ACTIVE (or FAILED, or --timeout)
#   tpu/create.sh --wait [--timeout=6h]   # wait for an existing queued resource ($TPU_NAME-qr)
#   tpu/create.sh --spot                  # spot (preemptible) capacity; see docs/tpu_vms.md, "Preemption"
#   tpu/create.sh --queued --reserved --network=N --subnetwork=S --internal-ips --labels=team=ml \
#       --service-account=SA --scopes=cloud-platform --valid-until-duration=6h   # passed to gcloud as given
#   tpu/create.sh --queued -- --any-gcloud-flag=value     # everything after -- goes to gcloud unchecked
# Settings (environment or tpu/config.env): TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (e.g. v4-32,
# v5litepod-16, v5p-64, v6e-8), RUNTIME_VERSION (derived from ACCELERATOR_TYPE when unset), NODE_COUNT
# (slices of a multislice queued resource), GCLOUD_TRACK=alpha for flags only gcloud alpha has (--reservation).
# WAIT_POLL_S: seconds between --wait polls (default 30).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,14p' "$0"; }

# Flags that only `queued-resources create` has (gcloud reference, compute tpus queued-resources create).
QUEUED_ONLY="--valid-until-duration --valid-until-time --valid-after-duration --valid-after-time --guaranteed
--reservation-host-project --reservation-host-folder --reservation-host-organization"

queued=0
wait=0
timeout=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --queued) queued=1 ;;
    --wait) wait=1 ;;
    --timeout=*) timeout="${1#--timeout=}" ;;
    --timeout) echo "--timeout needs a value: --timeout=6h (s, m, h or d)" >&2; exit 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    --version|--version=*|--runtime-version|--runtime-version=*|--accelerator-type|--accelerator-type=*)
      echo "$1: set RUNTIME_VERSION / ACCELERATOR_TYPE instead (environment or tpu/config.env)" >&2; exit 2 ;;
    --zone|--zone=*|--project|--project=*)
      echo "$1: set ZONE / PROJECT instead (environment or tpu/config.env)" >&2; exit 2 ;;
    --node-id|--node-id=*|--node-prefix|--node-prefix=*)
      echo "$1: set TPU_NAME instead; the node (or the slices' prefix) is named after it" >&2; exit 2 ;;
    --*)
      flag="${1%%=*}"
      if [ "$flag" = --reservation ] && [ -z "$GCLOUD_TRACK" ]; then
        echo "--reservation (a reservation by name) exists only in 'gcloud alpha': set GCLOUD_TRACK=alpha, or use" \
             "--reserved to take any matching reservation of the project" >&2
        exit 2
      fi
      if [ "$flag" = --node-count ]; then
        echo "--node-count: set NODE_COUNT=${1#--node-count=} (in tpu/config.env) instead, so that setup.sh and" \
             "run.sh reach every slice too" >&2
        exit 2
      fi
      extra+=("$1") ;;
    *) echo "unexpected argument '$1': options start with -- (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Seconds from 90, 90s, 30m, 6h or 2d.
seconds_of() {
  [[ "$1" =~ ^([0-9]+)([smhd]?)$ ]] || return 1
  local n="${BASH_REMATCH[1]}"
  case "${BASH_REMATCH[2]}" in
    m) n=$((n * 60)) ;;
    h) n=$((n * 3600)) ;;
    d) n=$((n * 86400)) ;;
  esac
  echo "$n"
}
timeout_s="$(seconds_of "${timeout:-24h}")" || {
  echo "--timeout=$timeout: give a duration such as 90s, 30m, 6h or 2d" >&2; exit 2; }
poll_s="${WAIT_POLL_S:-30}"
case "$poll_s" in
  ''|*[!0-9]*) echo "WAIT_POLL_S must be a whole number of seconds, not '$poll_s'" >&2; exit 2 ;;
esac

if [ "$queued" = 0 ]; then
  for arg in "${extra[@]+"${extra[@]}"}"; do
    flag="${arg%%=*}"
    for q in $QUEUED_ONLY; do
      if [ "$flag" = "$q" ]; then
        echo "$flag exists only for queued resources: add --queued" >&2; exit 2
      fi
    done
  done
  if [ "$NODE_COUNT" -gt 1 ] && [ "$wait" = 0 ]; then
    echo "NODE_COUNT=$NODE_COUNT (multislice) needs a queued resource: add --queued" >&2; exit 2
  fi
else
  for arg in "${extra[@]+"${extra[@]}"}"; do
    if [ "${arg%%=*}" = --preemptible ]; then
      echo "--preemptible: queued resources spell it --spot" >&2; exit 2
    fi
  done
fi

# Poll the queued resource until it is ACTIVE. Exit 1 when it can no longer become ACTIVE, 3 on the timeout.
wait_until_active() {
  local start now state last="" failures=0 err
  err="$(mktemp)"
  start="$(date +%s)"
  echo "Waiting for queued resource $QUEUED_RESOURCE to become ACTIVE (polling every ${poll_s}s," \
       "giving up after ${timeout_s}s)"
  while :; do
    now="$(date +%s)"
    if state="$(tpus queued-resources describe "$QUEUED_RESOURCE" --project="$PROJECT" \
        --zone="$ZONE" --format='value(state.state)' 2>"$err")"; then
      failures=0
      if [ "$state" != "$last" ] || [ $(( (now - start) % 600 )) -lt "$poll_s" ]; then
        echo "$(date -u +%H:%M:%S) $QUEUED_RESOURCE: ${state:-no state yet} ($(( (now - start) / 60 )) min waited)"
      fi
      last="$state"
      case "$state" in
        ACTIVE)
          echo "$QUEUED_RESOURCE is ACTIVE. Next: tpu/setup.sh"
          return 0 ;;
        FAILED|SUSPENDING|SUSPENDED|DELETING)
          echo "$QUEUED_RESOURCE is $state: it will not become ACTIVE. See why with:" >&2
          echo "  $GCLOUD ${GCLOUD_TRACK:+$GCLOUD_TRACK }compute tpus queued-resources describe $QUEUED_RESOURCE --project=$PROJECT --zone=$ZONE" >&2
          echo "then delete it (tpu/delete.sh) before creating it again." >&2
          return 1 ;;
      esac
    else
      failures=$((failures + 1))
      echo "$(date -u +%H:%M:%S) could not read the state of $QUEUED_RESOURCE ($failures/5): $(tail -n 1 "$err")" >&2
      if [ "$failures" -ge 5 ]; then
        echo "giving up: check that $QUEUED_RESOURCE exists in $ZONE ($GCLOUD ${GCLOUD_TRACK:+$GCLOUD_TRACK }compute tpus queued-resources list" \
             "--project=$PROJECT --zone=$ZONE)" >&2
        return 1
      fi
    fi
    if [ $(( now - start + poll_s )) -gt "$timeout_s" ]; then
      echo "$QUEUED_RESOURCE is still ${last:-not readable} after ${timeout_s}s. It stays in the queue: wait again" \
           "with 'tpu/create.sh --wait --timeout=...', or delete it with tpu/delete.sh." >&2
      return 3
    fi
    sleep "$poll_s"
  done
}

if [ "$wait" = 1 ] && [ "$queued" = 0 ]; then
  if [ ${#extra[@]} -gt 0 ]; then
    echo "--wait without --queued waits for an existing queued resource and creates nothing: drop ${extra[*]}" >&2
    exit 2
  fi
  wait_until_active
  exit $?
fi

echo "Creating $ACCELERATOR_TYPE '$TPU_NAME' in $ZONE (project $PROJECT, image $RUNTIME_VERSION)"
if [ "$queued" = 1 ]; then
  if [ "$NODE_COUNT" -gt 1 ]; then
    # Multislice: the slices are named $TPU_NAME-0 ... $TPU_NAME-(N-1).
    nodes=(--node-count="$NODE_COUNT" --node-prefix="$TPU_NAME")
  else
    nodes=(--node-id="$TPU_NAME")
  fi
  tpus queued-resources create "$QUEUED_RESOURCE" "${nodes[@]}" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${extra[@]+"${extra[@]}"}"
  if [ "$wait" = 1 ]; then
    wait_until_active
    exit $?
  fi
  echo "Queued. Wait for it with: tpu/create.sh --wait   (or watch: $GCLOUD ${GCLOUD_TRACK:+$GCLOUD_TRACK }compute tpus queued-resources" \
       "describe $QUEUED_RESOURCE --zone=$ZONE)"
else
  tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]+"${extra[@]}"}"
fi
