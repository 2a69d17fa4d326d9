#!/usr/bin/env bash
# Run one command on every worker of the slice at once (what multi-host JAX needs), in the installed
# checkout, in the background with its output in ~/agentlm-jax/run.log on each worker.
#   tpu/run.sh python -m agentlm_jax.train --config configs/llama2-7b.yaml data.path=gs://BUCKET/agentmix
#   tpu/run.sh --foreground python -m agentlm_jax.train ...   # stream worker 0..N output here instead
# Stop a background run with: tpu/run.sh --stop   (SIGTERM to `python -m agentlm_jax.train` only: the trainer
# saves a checkpoint first; export or generate runs are left alone)
source "$(dirname "$0")/common.sh"

# What --stop signals: the trainer's command line (python -m agentlm_jax.train ...), nothing else. The [a] keeps
# the pattern from matching itself in the remote shell that runs pkill; export and generate don't match.
TRAINER_PATTERN='[a]gentlm_jax[.]train( |$)'

foreground=0
case "${1:-}" in
  --foreground) foreground=1; shift ;;
  --stop) on_all_workers "pkill -TERM -f '$TRAINER_PATTERN' || true"; exit 0 ;;
  -h|--help|"") sed -n '2,7p' "$0"; exit 0 ;;
esac

quoted="$(printf '%q ' "$@")"
cmd="cd ~/$REMOTE_DIR && export PATH=\$HOME/$REMOTE_DIR/.venv/bin:\$PATH"
if [ "$foreground" = 1 ]; then
  on_all_workers "$cmd && $quoted"
else
  on_all_workers "$cmd && (nohup $quoted > run.log 2>&1 &) && echo started on \$(hostname)"
  echo "Follow worker 0 with: $GCLOUD compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/$REMOTE_DIR/run.log'"
fi
