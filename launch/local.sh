#!/usr/bin/env bash
# Train on this machine: python -m echoclip_jax.train with the given config and workdir.
#   launch/local.sh [--dry_run] CONFIG WORKDIR [--config.x=y ...]
# Extra arguments go to echoclip_jax.train. --dry_run prints the command instead of running it.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry_run] CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-python}
CMD=("$PYTHON" -m echoclip_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@")
if [[ $DRY_RUN == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
