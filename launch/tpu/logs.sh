#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Follows the training log of one worker (default 0, the one that logs metrics).
# Usage: launch/tpu/logs.sh [--dry-run] [--worker=N]
# Settings (environment): TPU_NAME, ZONE, PROJECT, RUN_LOG.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE
worker=0
for arg in "${ARGS[@]}"; do
  case $arg in
    --worker=*) worker=${arg#--worker=} ;;
    *)
      echo "error: unexpected argument $arg" >&2
      exit 2
      ;;
  esac
done
location_flags
run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$worker" \
  --command="tail -n +1 -F ~/$RUN_LOG"
