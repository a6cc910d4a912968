#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts `python -m mvmae_jax.main` with the given flags on every worker of the TPU VM,
# detached (output in ~/$RUN_LOG on each worker; follow it with logs.sh). A worker where a run
# is already going is left alone. The workdir must be on gs://: a run started again resumes
# from its latest checkpoint.
# Usage: launch/tpu/run.sh [--dry-run] --config=configs/vit_b.py --workdir=gs://... [flags...]
# Settings (environment): TPU_NAME, ZONE, PROJECT, REMOTE_DIR, REMOTE_VENV, RUN_LOG.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE
require_gcs_workdir "${ARGS[@]}"
on_all_workers "$(training_command "${ARGS[@]}")"
