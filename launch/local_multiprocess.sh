#!/usr/bin/env bash
# Runs mvmae_jax.main as NUM_PROCESSES local processes with DEVICES_PER_PROCESS CPU devices each,
# joined through a coordinator on 127.0.0.1 (collectives over gloo): multi-host training on one
# machine. The multi-host tests run through it.
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [main flags...]
#   e.g. launch/local_multiprocess.sh 2 2 --config=configs/quickstart.py --workdir=/tmp/mp
# Environment:
#   COORDINATOR_PORT  the coordinator's port (default: a free port)
#   LOG_DIR           where process_<i>.log are written (default: a new temporary directory)
#   PYTHON            the interpreter (default: python)
# Process 0's output is also shown on stdout. If a process fails, the others are killed and the
# script exits with its status. Ctrl-C or SIGTERM sends SIGTERM to every process: they
# checkpoint at the same step and exit (a second one kills them). Needs bash >= 5.
set -euo pipefail
shopt -s extglob

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [mvmae_jax.main flags...]" >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
num_processes=$1
devices=$2
shift 2
[[ $num_processes =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ ]] || usage

python=${PYTHON:-python}
if [[ -z ${COORDINATOR_PORT:-} ]]; then
  # Bound then released: a small race with other programs, which COORDINATOR_PORT avoids.
  COORDINATOR_PORT=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi
log_dir=${LOG_DIR:-$(mktemp -d -t mvmae_multiprocess.XXXXXX)}
mkdir -p "$log_dir"

# The caller's other XLA flags are kept; the device count is this script's.
xla_flags=${XLA_FLAGS:-}
read -r -a kept <<<"${xla_flags//--xla_force_host_platform_device_count=+([0-9])/}"
kept+=(--xla_force_host_platform_device_count="$devices")
xla_flags="${kept[*]}"

echo "$num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$COORDINATOR_PORT," \
  "logs in $log_dir" >&2

# Signals the processes still running: `jobs -p` lists the children not yet reaped, so never
# a pid that another program has taken over since.
kill_all() {
  local pid
  for pid in $(jobs -p); do
    kill -"$1" "$pid" 2>/dev/null || true
  done
}

signals=0
on_signal() {
  signals=$((signals + 1))
  if ((signals == 1)); then
    echo "Stopping: SIGTERM to every process (they checkpoint, then exit)." >&2
    kill_all TERM
  else
    kill_all KILL
  fi
}
trap on_signal INT TERM
trap 'kill_all KILL' EXIT  # a no-op once every process has ended

for ((i = 0; i < num_processes; i++)); do
  log="$log_dir/process_$i.log"
  command=("$python" -m mvmae_jax.main "$@"
    --coordinator_address="127.0.0.1:$COORDINATOR_PORT" --num_processes="$num_processes"
    --process_id="$i")
  if ((i == 0)); then
    # Also on stdout; tee runs in a process substitution, which `wait -n` does not count.
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu "${command[@]}" > >(tee "$log") 2>&1 &
  else
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu "${command[@]}" >"$log" 2>&1 &
  fi
done

status=0
finished=0
while ((finished < num_processes)); do
  before=$signals
  code=0
  wait -n || code=$?
  if ((signals != before && code > 128)); then
    continue  # the wait was interrupted by our own trap, not ended by a process
  fi
  finished=$((finished + 1))
  if ((code != 0)); then
    status=$code
    break
  fi
done

if ((status != 0)); then
  kill_all KILL
  echo "A process failed (exit status $status); the others were stopped. Logs: $log_dir" >&2
  for ((i = 0; i < num_processes; i++)); do
    echo "--- the end of process_$i.log ---" >&2
    tail -n 15 "$log_dir/process_$i.log" >&2
  done
  exit "$status"
fi
echo "All $num_processes processes finished. Logs: $log_dir" >&2
