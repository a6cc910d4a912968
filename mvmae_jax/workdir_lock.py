"""One run at a time per workdir: `hold(workdir)` creates `WORKDIR/lock` atomically and takes
over a stale one (docs/implementation.md)."""

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
# A lock with this process's pid but none of these tokens is a dead earlier process's.
_HELD_TOKENS: set[str] = set()


class WorkdirLockedError(ValueError):
    """Another live run holds the workdir; the message names it."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write(path: str, record: dict, replace: bool) -> bool:
    """Writes `record` to `path` atomically; without `replace`, False if `path` exists."""
    temporary = f"{path}.{record['token']}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f)
    if replace:
        os.replace(temporary, path)
        return True
    try:
        os.link(temporary, path)  # Fails if the lock exists; readers never see a partial file.
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)


def _read(path: str) -> dict | None:
    """The lock's record; None if there is none, {} if it is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _holder(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("start_time", 0)))
    return (f"process {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {started}")


def _stale_reason(record: dict, stale_after_s: float) -> str | None:
    """Why the lock's holder is gone, or None if it may be alive."""
    if not record:
        return "the lock file is unreadable"
    pid = int(record.get("pid", -1))
    if record.get("host") != socket.gethostname():
        age = time.time() - float(record.get("heartbeat", 0))
        return (f"host {record.get('host')} has not renewed it for {age:.0f} s"
                if age > stale_after_s else None)
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
    return f"pid {pid} now belongs to another process" if saved and now and saved != now else None


class WorkdirLock:
    """A held workdir lock, its heartbeat renewed by a thread."""

    def __init__(self, path: str, record: dict):
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir_lock")
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.record["heartbeat"] = time.time()
            try:
                if (_read(self.path) or {}).get("token") != self.record["token"]:
                    logging.warning("%s is no longer this run's lock.", self.path)
                    return
                _write(self.path, self.record, replace=True)
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
    """Takes WORKDIR/lock (None on object stores); WorkdirLockedError if a live run holds it."""
    if "://" in workdir:
        logging.warning("No workdir lock on %s (object stores cannot create a file atomically "
                        "here): make sure no other run uses this workdir.", workdir)
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    token = secrets.token_hex(8)
    for _ in range(3):
        now = time.time()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": now,
                  "heartbeat": now, "token": token, "process_start": _process_start(os.getpid())}
        if _write(path, record, replace=False):
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
        # Renaming takes it for one starter only; another starter's fresh lock is put back.
        claimed = f"{path}.{token}.stale"
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue
        if (_read(claimed) or {}).get("token") != existing.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(claimed, path)
            os.remove(claimed)
            continue
        os.remove(claimed)
        logging.warning("Taking over the stale workdir lock of %s: %s.", _holder(existing), reason)
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
