#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts the run again after a preemption (a spot TPU reclaimed, a maintenance event): if the
# queued resource is no longer ACTIVE it is deleted and requested again, the workers are set
# up, and run.sh starts the same command, which resumes from the latest checkpoint in the gs://
# workdir. With the TPU still ACTIVE, only run.sh is called (it skips workers that still run).
# Usage: launch/tpu/rerun.sh [--spot] [--dry-run] --config=... --workdir=gs://... [flags...]
# (the same flags as the first run.sh). Under --dry-run the TPU is taken as preempted and every
# command of the recovery is printed.
# Settings (environment): as create.sh, setup.sh and run.sh.
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=common.sh
source "$here/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE
require_gcs_workdir "${ARGS[@]}"
location_flags

dry=()
if ((DRY_RUN)); then
  dry=(--dry-run)
fi
spot=()
if [[ $SPOT == 1 ]]; then
  spot=(--spot)
fi

describe=("$GCLOUD" compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}"
  --format='value(state.state)')
if ((DRY_RUN)); then
  run "${describe[@]}"
  state=SUSPENDED
else
  state=$("${describe[@]}" 2>/dev/null || echo MISSING)
fi
echo "Queued resource $QUEUED_RESOURCE: $state" >&2

if [[ $state != ACTIVE ]]; then
  if [[ $state != MISSING ]]; then
    "$here/delete.sh" "${dry[@]}"
  fi
  "$here/create.sh" "${dry[@]}" "${spot[@]}"
  "$here/setup.sh" "${dry[@]}"
fi
"$here/run.sh" "${dry[@]}" "${ARGS[@]}"
