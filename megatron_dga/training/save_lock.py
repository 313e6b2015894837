"""One writer per --save directory: an owner record ``<save>/.writer.lock``.

Two runs saving into one directory delete each other's work: each save removes the scratch
directories it finds (another run's half-written checkpoint among them), and --keep-last rotates
the other run's checkpoints away. So the first thing a run does with --save (rank 0, in
``outputs.prepare_outputs``, before any dataset or model is built) is to create the owner record
with ``O_EXCL``: host, pid, the process's start time, the run's start time and a run id. Another
run finding it refuses to start with one ConfigError naming the holder and the fix.

The record is removed when the run ends (the normal exit path and ``atexit``). A record left by a
run that crashed or was killed with SIGKILL is stale and is taken over with a warning:

* same host: its process is no longer running (pid gone, or reused by a process started later);
* another host (whose processes cannot be seen from here): the holder refreshes the record's
  modification time every :data:`HEARTBEAT_S` seconds while it runs, so a record untouched for
  :data:`STALE_AFTER_S` seconds is stale; a fresher one is refused, naming the file to delete if
  that run is known to be gone.

A process may take the lock of a directory it already holds (a resume of its own --save, several
Trainers one after another in one process). Taking over is a rename of the stale record aside
followed by a new ``O_EXCL`` create, so of two runs taking over at once only one succeeds.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Optional

from megatron_dga.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".writer.lock"
"""The owner record's name inside --save."""
HEARTBEAT_S = 60.0
"""How often a running holder refreshes its record's modification time."""
STALE_AFTER_S = 600.0
"""A record of another host untouched for this long belongs to a run that is gone."""

_held: Dict[str, "WriterLock"] = {}
_held_guard = threading.Lock()
_heartbeat: Optional[threading.Thread] = None


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, start: Optional[str]) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that wrote the record (same start time)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


class WriterLock:
    """This process's owner record of one --save directory (see the module docstring)."""

    def __init__(self, path: Path, record: dict):
        self.path = path
        self.record = record

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def holds(self) -> bool:
        """Whether the record on disk is still this lock's."""
        return (_read(self.path) or {}).get("run_id") == self.run_id

    def refresh(self) -> None:
        """Touch the record (the heartbeat another host's run reads); drop the lock if it is gone."""
        try:
            os.utime(self.path)
        except OSError:
            self._forget()

    def release(self) -> None:
        """Remove the record if it is still this lock's; safe to call twice."""
        try:
            if self.holds():
                self.path.unlink()
        except OSError as exc:
            logger.warning("could not remove the --save lock %s: %s; delete it before the next run", self.path, exc)
        self._forget()

    def _forget(self) -> None:
        with _held_guard:
            if _held.get(str(self.path)) is self:
                del _held[str(self.path)]


def _read(path: Path) -> Optional[dict]:
    """The record at ``path``; None when missing; {} when unreadable (a create caught half-way, or garbage)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _new_record() -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "time_unix": now,
        "run_id": uuid.uuid4().hex[:12],
        "command": " ".join(sys.argv)[:300],
    }


def _create(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` if it does not exist (``O_EXCL``); False if it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')!s}, started {holder.get('started', '?')} "
        f"(run {holder.get('run_id', '?')}: {str(holder.get('command', '?'))[:120]})"
    )


def _stale_reason(path: Path, holder: dict, host: str) -> Optional[str]:
    """Why the record ``holder`` at ``path`` is stale (None: its run is alive, or may be)."""
    if not holder:
        # Unreadable: another run creating it right now, or garbage. Give a creator a moment.
        age = _age(path)
        return f"it is unreadable and {age:.0f} s old" if age is not None and age > 5.0 else None
    if holder.get("host") == host:
        if holder.get("pid") == os.getpid() and holder.get("pid_start") == _process_start(os.getpid()):
            return "this process holds it"
        if not _running(holder.get("pid"), holder.get("pid_start")):
            return "its process is no longer running (it crashed or was killed)"
        return None
    age = _age(path)
    if age is not None and age > STALE_AFTER_S:
        return f"it was last refreshed {age:.0f} s ago (a running holder refreshes it every {HEARTBEAT_S:.0f} s)"
    return None


def _age(path: Path) -> Optional[float]:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def acquire(save_dir: str | os.PathLike) -> WriterLock:
    """Take the lock of ``save_dir`` (which exists) for this process, or ConfigError naming its holder.

    Call on the rank that coordinates saves (rank 0); it is released at exit (:func:`release_all`,
    ``atexit``).
    """
    path = Path(save_dir) / LOCK_FILENAME
    host = socket.gethostname()
    for _ in range(20):
        record = _new_record()
        if _create(path, record):
            return _hold(path, record)
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile
        reason = _stale_reason(path, holder, host)
        if reason is None and not holder:
            time.sleep(0.1)
            continue
        if reason is None:
            if holder.get("host") == host:
                where = "on this host"
                fix = "wait for it to finish or stop it"
            else:
                age = _age(path)
                where = f"on host {holder.get('host')} (its record was refreshed {age or 0:.0f} s ago)"
                fix = (
                    f"wait for it to finish or stop it; if that run is known to be gone (a crashed node), delete "
                    f"{path}, or wait {STALE_AFTER_S / 60:.0f} minutes after its last refresh"
                )
            raise ConfigError(
                f"--save {save_dir} is in use by another run {where}: {_describe(holder)}; two runs saving into one "
                f"directory delete each other's checkpoints; {fix}, or give this run another --save"
            )
        if reason != "this process holds it":
            logger.warning("--save %s: taking over the lock %s of %s: %s", save_dir, path, _describe(holder), reason)
        aside = path.with_name(f"{LOCK_FILENAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, aside)  # only one of several runs taking over at once moves it
        except FileNotFoundError:
            continue
        moved = _read(aside)
        try:
            aside.unlink()
        except OSError:
            pass
        if moved and moved.get("run_id") != holder.get("run_id"):
            _create(path, moved)  # another run's fresh record, written after ours was read: put it back
    raise ConfigError(
        f"--save {save_dir}: could not take its lock {path} (it keeps changing); another run is "
        "starting in the same directory: give each run its own --save"
    )


def _hold(path: Path, record: dict) -> WriterLock:
    global _heartbeat
    lock = WriterLock(path, record)
    with _held_guard:
        _held[str(path)] = lock  # replaces this process's earlier lock of the directory, if any
        if _heartbeat is None:
            _heartbeat = threading.Thread(target=_beat, name="save-lock-heartbeat", daemon=True)
            _heartbeat.start()
    return lock


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_guard:
            locks = list(_held.values())
        for lock in locks:
            lock.refresh()


def release_all() -> None:
    """Release every lock this process holds (the run's normal end; also registered with ``atexit``)."""
    with _held_guard:
        locks = list(_held.values())
    for lock in locks:
        lock.release()


def held(save_dir: str | os.PathLike) -> Optional[WriterLock]:
    """This process's lock of ``save_dir``, if it holds one."""
    return _held.get(str(Path(save_dir) / LOCK_FILENAME))


atexit.register(release_all)
