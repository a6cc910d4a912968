"""A workdir lock: one run at a time per workdir.

`hold(workdir)` creates `WORKDIR/lock` (JSON: pid, host, start time, token) atomically and
removes it on exit. A second run on a workdir whose lock is live stops with WorkdirLockedError
naming the holder. A lock is stale, and taken over with a warning, when
- its process is gone: same host and the pid no longer runs (or runs a different program,
  known by its start time in /proc), or
- it comes from another host and its heartbeat (rewritten every `HEARTBEAT_S` seconds by the
  holder) is older than `stale_after_s`: the liveness of a process on another host cannot be
  checked, so a run preempted on one machine and resumed on another waits for that long.
Multi-host runs: only process 0 holds the lock (`hold(..., enabled=jax.process_index() == 0)`).
Object stores (gs://...) have no atomic create here: the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

LOCK_FILE = "lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
_HELD_TOKENS: set[str] = set()  # Locks this process holds (a lock with our pid but another
                                # token is a dead earlier process's, e.g. pid 1 in containers).


class WorkdirLockedError(ValueError):
    """Another live run holds the workdir; the message names it."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record(token: str) -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": now,
            "heartbeat": now, "token": token, "process_start": _process_start(os.getpid())}


def _write_new(path: str, record: dict) -> bool:
    """Creates `path` holding `record`, atomically; False if it exists."""
    temporary = f"{path}.{record['token']}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f)
    try:
        os.link(temporary, path)  # Fails if the lock exists; readers never see a partial file.
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # Unreadable: written by something else, or torn by a crash.


def _holder(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("start_time", 0)))
    return (f"process {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {started}")


def _stale_reason(record: dict, stale_after_s: float) -> str | None:
    """Why the lock's holder is gone, or None if it may be alive."""
    if not record:
        return "the lock file is unreadable"
    pid = int(record.get("pid", -1))
    if record.get("host") == socket.gethostname():
        if pid == os.getpid():
            return None if record.get("token") in _HELD_TOKENS else (
                "it is an earlier process's with this process's pid")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} has exited"
        except PermissionError:
            pass  # Alive, another user's.
        saved, now = record.get("process_start"), _process_start(pid)
        if saved and now and saved != now:
            return f"pid {pid} now belongs to another process"
        return None
    age = time.time() - float(record.get("heartbeat", 0))
    if age > stale_after_s:
        return f"host {record.get('host')} has not renewed it for {age:.0f} s"
    return None


class WorkdirLock:
    """A held workdir lock; `release()` removes it (done by `hold` on exit)."""

    def __init__(self, path: str, record: dict):
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir_lock")
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.record["heartbeat"] = time.time()
            temporary = f"{self.path}.{self.record['token']}.tmp"
            try:
                if (_read(self.path) or {}).get("token") != self.record["token"]:
                    logging.warning("%s is no longer this run's lock.", self.path)
                    return
                with open(temporary, "w") as f:
                    json.dump(self.record, f)
                os.replace(temporary, self.path)
            except OSError as error:
                logging.warning("Could not renew the workdir lock %s (%s).", self.path, error)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        _HELD_TOKENS.discard(self.record["token"])
        if (_read(self.path) or {}).get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def acquire(workdir: str, stale_after_s: float = STALE_AFTER_S) -> WorkdirLock | None:
    """Takes WORKDIR/lock (None on object stores: not locked); WorkdirLockedError if a live run
    holds it."""
    if "://" in workdir:
        logging.warning("No workdir lock on %s (object stores cannot create a file atomically "
                        "here): make sure no other run uses this workdir.", workdir)
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    token = secrets.token_hex(8)
    for _ in range(3):
        record = _record(token)
        if _write_new(path, record):
            _HELD_TOKENS.add(token)
            return WorkdirLock(path, record)
        existing = _read(path)
        if existing is None:
            continue  # Released in between.
        reason = _stale_reason(existing, stale_after_s)
        if reason is None:
            raise WorkdirLockedError(
                f"{workdir} is in use by {_holder(existing)} (its lock {path}); use another "
                "workdir, or delete the lock if that run is gone")
        # Take the stale lock by renaming it: only one of several starters gets it.
        claimed = f"{path}.{token}.stale"
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue
        taken = _read(claimed) or {}
        if taken.get("token") != existing.get("token"):
            # A fresh lock of another starter: put it back, then look again.
            with contextlib.suppress(FileExistsError):
                os.link(claimed, path)
            os.remove(claimed)
            continue
        os.remove(claimed)
        logging.warning("Taking over the stale workdir lock of %s: %s.", _holder(existing),
                        reason)
    raise WorkdirLockedError(f"could not take the workdir lock {path}; another run is starting "
                             "on this workdir")


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True,
         stale_after_s: float = STALE_AFTER_S) -> Iterator[WorkdirLock | None]:
    """Holds WORKDIR/lock for the duration of the block (nothing when not `enabled`)."""
    lock = acquire(workdir, stale_after_s) if enabled else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
