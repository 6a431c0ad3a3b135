#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every host (gcloud ... ssh --worker=all).
# jax.distributed.initialize() auto-detects the pod, so no coordinator flags are needed.
#   launch/tpu_pod.sh [--dry_run] [--preflight[=TOPOLOGY]] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# WORKDIR must be shared by all hosts (a gs:// bucket or a shared filesystem); the repository must be
# checked out at REPO_DIR (default ~/echoclip-jax) with its venv on every host: `make setup` there detects the
# TPU and installs libtpu (it needs Python 3.11-3.13 and says how to get one; README: Setting up a Cloud TPU VM).
# --preflight first compiles the train step for the slice on this machine (python -m echoclip_jax.aot, the
# `tpu` extra: make setup-aot; no TPU needed) and starts the pod job only if it fits the chips' HBM. TOPOLOGY (v5e-16,
# v4-32, ...) defaults to the slice's accelerator type from `gcloud compute tpus tpu-vm describe`.
set -euo pipefail
DRY_RUN=0
PREFLIGHT=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --preflight) PREFLIGHT=describe ;;
    --preflight=*) PREFLIGHT=${1#--preflight=} ;;
    *) echo "$0: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry_run] [--preflight[=TOPOLOGY]] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=${REPO_DIR:-'~/echoclip-jax'}
PROJECT_FLAG=()
if [[ -n "${GCP_PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$GCP_PROJECT"); fi
EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done
REMOTE="cd $REPO_DIR && .venv/bin/python -m echoclip_jax.train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$EXTRA"
CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$REMOTE")

if [[ -n $PREFLIGHT ]]; then
  HERE=$(cd "$(dirname "$0")/.." && pwd)
  PY=${PYTHON:-$HERE/.venv/bin/python}
  DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --format 'value(acceleratorType)')
  if [[ $DRY_RUN == 1 ]]; then
    if [[ $PREFLIGHT == describe ]]; then SHOWN="\"\$($(printf '%q ' "${DESCRIBE[@]}"))\""; else SHOWN=$(printf '%q' "$PREFLIGHT"); fi
    echo "cd $(printf '%q' "$HERE") && $(printf '%q ' "$PY" -m echoclip_jax.aot --config "$CONFIG" --topology)$SHOWN$EXTRA"
  else
    if [[ $PREFLIGHT == describe ]]; then TOPOLOGY=$("${DESCRIBE[@]}"); else TOPOLOGY=$PREFLIGHT; fi
    AOT=("$PY" -m echoclip_jax.aot --config "$CONFIG" --topology "$TOPOLOGY" "$@")
    echo "preflight: compiling the train step for $TOPOLOGY on this machine" >&2
    status=0
    (cd "$HERE" && "${AOT[@]}") || status=$?
    if [[ $status != 0 ]]; then
      echo "preflight failed (exit $status): not starting the pod job; see echoclip_jax.aot's report above" >&2
      exit "$status"
    fi
  fi
fi
if [[ $DRY_RUN == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
