#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Requests a Cloud TPU VM slice as a queued resource and waits until it is ACTIVE.
# Usage: launch/tpu/create.sh [--spot] [--dry-run]
# Settings (environment): TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE, RUNTIME_VERSION,
# QUEUED_RESOURCE, SPOT=1 (same as --spot); see launch/README.md.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
if ((${#ARGS[@]})); then
  echo "error: unexpected arguments: ${ARGS[*]}" >&2
  exit 2
fi
location_flags

create=("$GCLOUD" compute tpus queued-resources create "$QUEUED_RESOURCE"
  --node-id="$TPU_NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE"
  --runtime-version="$RUNTIME_VERSION")
if [[ $SPOT == 1 ]]; then
  create+=(--spot)  # preemptible: cheaper, reclaimed at any time (see rerun.sh)
fi
run "${create[@]}"

describe=("$GCLOUD" compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}"
  --format='value(state.state)')
if ((DRY_RUN)); then
  run "${describe[@]}"
  exit 0
fi
echo "Waiting for $QUEUED_RESOURCE to become ACTIVE (queued resources can wait for capacity)." >&2
while true; do
  state=$("${describe[@]}")
  echo "$(date +%T) $state" >&2
  case $state in
    ACTIVE) break ;;
    FAILED | SUSPENDED)
      echo "error: the queued resource is $state" >&2
      exit 1
      ;;
  esac
  sleep 60
done
