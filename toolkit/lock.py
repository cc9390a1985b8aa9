"""One run per output directory: the lock file ``OUT/.armor-lock``.

A run that writes into a directory holds that directory's lock from before its first write to after its last:

* **Holding** is an exclusive ``flock`` on the open lock file, which the kernel drops when the process ends, however
  it ends (exit, exception, SIGKILL, OOM kill). The file also records the owner — pid, host, boot id, the pid's start
  time and when the run began — for the refusal message and for the checks below.
* **A second run** finds the ``flock`` taken and stops with a one-line error (exit 1) naming the owner.
* **A stale lock** (the file is there but nobody holds its ``flock``: its owner was killed) is taken over in place:
  the new owner keeps the same file, holds its ``flock`` and rewrites the record. Because holding never depends on
  the pid, a recycled pid cannot make a dead run look alive, nor a live one dead. As a second line of defence, on
  file systems where ``flock`` may silently lock nothing, a record naming a process of this host that is still
  running — same pid, same boot, same start time, so not a recycled pid — is never taken over.
* **A lock from another host** whose ``flock`` is free is *not* taken over: whether a network file system passes
  locks between hosts depends on how it is mounted, and a process on another host cannot be checked from here. The
  error names the host and tells the user to delete the file once no run is active there.
* **Releasing** removes the file while still holding the ``flock``; a process that opened the old file meanwhile
  notices (its file is no longer the one at the path) and starts over, so two runs can never both hold the lock.

API: ``with acquire_lock(directory): ...`` (or ``lock = acquire_lock(directory)`` … ``lock.release()``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import EXIT_FAILURE, ArmorError
from .files import fault_point, write_failed

try:
    import fcntl
except ImportError:  # Windows: no flock, so no way to tell a dead owner from a live one: any record is refused
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".armor-lock"


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock: enough to tell a live owner from a dead one on its own host."""

    pid: int
    host: str
    boot_id: str  # changes at every boot: a pid from an earlier boot is dead
    pid_start: str  # the process's start time since boot (/proc/PID/stat field 22): tells a recycled pid apart
    started: str  # when the run took the lock (local time, for the message)

    @classmethod
    def of_this_process(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), _boot_id(), _pid_start(os.getpid()), time.strftime("%F %T"))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.started}"

    def running_here(self) -> bool:
        """True when this record names a process of this host that is still running (not a recycled pid)."""
        if self.host != socket.gethostname() or self.boot_id != _boot_id():
            return False
        start = _pid_start(self.pid)
        return bool(start) and start == self.pid_start


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot, or ``""`` when there is no such process (or no
    /proc to ask)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)" start at field 3; starttime is field 22


def _read_owner(fd: int) -> LockOwner | None:
    """The owner recorded in an open lock file; ``None`` when it is empty or unreadable (a writer was killed)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    try:
        record: Any = json.loads(data)
        return LockOwner(**{k: type(v)(record[k]) for k, v in asdict(LockOwner(0, "", "", "", "")).items()})
    except (ValueError, TypeError, KeyError):
        return None


class RunLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) gives it back and removes the file."""

    def __init__(self, fd: int, path: Path, previous: LockOwner | None) -> None:
        self.fd, self.path = fd, path
        self.previous = previous  # the stale owner this lock was taken over from, if any

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if _same_file(self.fd, self.path):
                fault_point("remove", self.path)
                self.path.unlink()
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _held_by_other(fd: int) -> bool:
    """Try to take the ``flock`` without waiting; True when another open file holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False  # no kernel locks here: the owner record decides
        raise
    return False


def acquire_lock(directory: str | os.PathLike) -> RunLock:
    """Take ``directory``'s run lock, taking over a stale one; :class:`ArmorError` (exit 1) when another run holds
    it, or when a lock from another host cannot be judged from here."""
    path = Path(directory) / LOCK_FILE
    for _ in range(10):  # starts over only when a releasing owner removed the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            held = _held_by_other(fd)
            owner = _read_owner(fd)
            if held or (owner is not None and (fcntl is None or owner.running_here())):
                who = owner.describe() if owner else "an owner still starting"
                raise ArmorError(
                    f"{directory} is in use by another armor-ref run ({who})",
                    "wait for that run to finish, or write to another directory",
                    exit_code=EXIT_FAILURE,
                )
            if not _same_file(fd, path):
                os.close(fd)
                continue
            if owner is not None and owner.host != socket.gethostname():
                raise ArmorError(
                    f"{directory} is locked by a run on another host ({owner.describe()})",
                    f"if no armor-ref run is active on {owner.host} any more, delete {path} and run again",
                    exit_code=EXIT_FAILURE,
                )
            record = json.dumps(asdict(LockOwner.of_this_process()), sort_keys=True).encode()
            try:
                fault_point("write", path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
                os.fsync(fd)
            except OSError as err:
                raise write_failed(path, err) from None
            return RunLock(fd, path, owner)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
    raise ArmorError(f"cannot lock {directory}: its lock file keeps changing", "try again", exit_code=EXIT_FAILURE)
