"""One writer per workdir: an advisory lock (WORKDIR/LOCK_FILE) held by a trainer for its whole run.

calm-train and calm-quickstart take it before they write anything; a second writer
is refused at once with the host and pid of the holder. The lock is a flock(2) on
an open file, so the kernel drops it when its process dies: a run killed with
kill -9 never blocks the rerun, and no stale lock needs removing. Readers
(calm-eval, calm-generate) take no lock: they only ever see checkpoints that a
writer has committed (orbax renames a step into place when it is complete).
In a multi-host run process 0 holds the lock and every process gets its verdict.
flock is local to a host on some network filesystems: there, two runs on
different hosts are not kept apart.
"""
import fcntl
import json
import os
import socket
import time

from calm_jax import errors
from calm_jax.parallel import distributed

LOCK_FILE = ".calm_writer.lock"


class WorkdirLocked(errors.UserError):
  """Another live process is writing to the workdir."""


def _holder(path):
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
    return f"host {info['host']} pid {info['pid']} (since {info['since']})"
  except (OSError, ValueError, KeyError):
    return "another process (its host and pid are not written yet)"


def check_workdir_path(workdir):
  """A workdir that is a file (or cannot be created) is a UserError naming it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir!r} is a file, not a directory; pass a "
                           "directory (it is created when missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"--workdir={workdir!r} cannot be created ({e.strerror}); pass a "
                           "writable directory.") from e


class WorkdirLock:
  """Context manager: holds WORKDIR/LOCK_FILE (process 0) from __enter__ to __exit__."""

  def __init__(self, workdir, what="calm-train"):
    self.workdir, self.what = workdir, what
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def _acquire(self):
    """'' once held, else the message naming the holder (process 0 only)."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      return f"{self.path} cannot be opened ({e.strerror}); pass a writable --workdir."
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      return (f"{self.workdir} is in use by {_holder(self.path)}, a live {self.what} or "
              "calm-quickstart; wait for it to finish (or stop it), or use another --workdir.")
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "by": self.what}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    self._fd = fd
    return ""

  def __enter__(self):
    check_workdir_path(self.workdir)
    message = distributed.from_primary("workdir_lock", self._acquire)   # runs on process 0
    if message:
      raise WorkdirLocked(message)
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)              # releases the flock; the file stays (harmless)
      self._fd = None
    return False
