#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every host (gcloud ... ssh --worker=all).
# jax.distributed.initialize() auto-detects the pod, so no coordinator flags are needed.
#   launch/tpu_pod.sh [--dry_run] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# WORKDIR must be shared by all hosts (a gs:// bucket or a shared filesystem); the repository must be
# checked out at REPO_DIR (default ~/echoclip-jax) with its venv on every host.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry_run] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=${REPO_DIR:-'~/echoclip-jax'}
PROJECT_FLAG=()
if [[ -n "${GCP_PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$GCP_PROJECT"); fi
EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done
REMOTE="cd $REPO_DIR && .venv/bin/python -m echoclip_jax.train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$EXTRA"
CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$REMOTE")
if [[ $DRY_RUN == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
