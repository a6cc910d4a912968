#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copies this repository to every worker of the TPU VM and installs it there with jax[tpu]
# (the package's `tpu` extra) in a virtualenv.
# Usage: launch/tpu/setup.sh [--dry-run]
# Settings (environment): TPU_NAME, ZONE, PROJECT, REMOTE_DIR, REMOTE_VENV; see launch/README.md.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_settings TPU_NAME ZONE
if ((${#ARGS[@]})); then
  echo "error: unexpected arguments: ${ARGS[*]}" >&2
  exit 2
fi
location_flags

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
archive=${TMPDIR:-/tmp}/mvmae_jax_src.tar.gz
run tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=.ci/venv \
  --exclude='__pycache__' -C "$repo_root" .
run "$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU_NAME:mvmae_jax_src.tar.gz" \
  "${LOCATION[@]}" --worker=all
steps=(
  "rm -rf ~/$REMOTE_DIR" "mkdir -p ~/$REMOTE_DIR"
  "tar -xzf ~/mvmae_jax_src.tar.gz -C ~/$REMOTE_DIR"
  "(python3 -m venv ~/$REMOTE_VENV || (sudo apt-get update && sudo apt-get install -y python3-venv && python3 -m venv ~/$REMOTE_VENV))"
  ". ~/$REMOTE_VENV/bin/activate" "pip install --quiet --upgrade pip"
  "pip install --quiet -e ~/$REMOTE_DIR'[tpu]'"
  # Every worker at once: the TPU runtime of a multi-host slice starts on all of them together.
  "python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
)
remote=$(printf ' && %s' "${steps[@]}")
on_all_workers "${remote# && }"
