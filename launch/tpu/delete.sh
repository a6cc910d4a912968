#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes the queued resource and its TPU VM (the gs:// workdir is kept).
# Usage: launch/tpu/delete.sh [--dry-run]
# Settings (environment): TPU_NAME, ZONE, PROJECT, QUEUED_RESOURCE.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE
location_flags
run "$GCLOUD" compute tpus queued-resources delete "$QUEUED_RESOURCE" "${LOCATION[@]}" \
  --force --quiet
