# shellcheck shell=bash
# Settings and helpers shared by the Cloud TPU scripts (sourced, not run). Every setting comes
# from an environment variable; see launch/README.md.

set -euo pipefail

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-${TPU_NAME}}
SPOT=${SPOT:-0}
REMOTE_DIR=${REMOTE_DIR:-mvmae_jax}  # on every worker, relative to the home directory
REMOTE_VENV=${REMOTE_VENV:-mvmae_venv}
RUN_LOG=${RUN_LOG:-mvmae_run.log}
GCLOUD=${GCLOUD:-gcloud}

DRY_RUN=0
ARGS=()

# Splits the script's arguments: --dry-run (and --spot, where the script allows it) are the
# script's; everything else goes to ARGS.
parse_args() {
  local arg
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      *) ARGS+=("$arg") ;;
    esac
  done
}

# Stops with a message naming every one of the given settings that is empty.
require_settings() {
  local name missing=()
  for name in "$@"; do
    [[ -n ${!name} ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    echo "error: set ${missing[*]} (see launch/README.md)" >&2
    exit 2
  fi
}

# The arguments as one shell line, quoted only where needed (`--flag='a value'`), so that
# the line can be pasted into a shell.
quote() {
  local arg prefix out=()
  for arg in "$@"; do
    prefix=
    if [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      prefix=${BASH_REMATCH[1]}
      arg=${BASH_REMATCH[2]}
    fi
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]*$ ]]; then
      out+=("$prefix$arg")
    else
      out+=("$prefix'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# The --zone/--project flags every gcloud command takes.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=(--project="$PROJECT")
  fi
}

# Runs a shell command on every worker of the TPU VM.
on_all_workers() {
  location_flags
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all \
    --command="$1"
}

# The remote command line that starts training on a worker, detached from the ssh session so
# that it survives it; does nothing where a run is already going.
training_command() {
  local flags
  flags=$(quote "$@")
  # The pid file, not pgrep: this very command line contains the module's name.
  echo "cd ~/$REMOTE_DIR && . ~/$REMOTE_VENV/bin/activate &&" \
    "if [ -f ~/$RUN_LOG.pid ] && kill -0 \$(cat ~/$RUN_LOG.pid) 2>/dev/null;" \
    "then echo \"already running on \$(hostname)\"; else" \
    "nohup python -m mvmae_jax.main $flags > ~/$RUN_LOG 2>&1 < /dev/null &" \
    "echo \$! > ~/$RUN_LOG.pid; fi"
}

# Multi-host checkpoints and metrics need storage that every worker sees.
require_gcs_workdir() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --workdir=gs://* ]]; then
      return 0
    fi
  done
  echo "error: pass --workdir=gs://BUCKET/PATH: every worker writes its part of each" \
    "checkpoint there, and a re-run resumes from it" >&2
  exit 2
}
