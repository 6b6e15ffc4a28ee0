"""One writer per folder: the lock file `<folder>/.adjax.lock` that `adjax pretrain`, `refs`,
`centers` and `evaluate` hold while they write.

Two runs writing the same folder would interleave checkpoints, metrics and results into a run
that neither of them is. The lock is a file created with O_CREAT | O_EXCL (atomic on local and
network file systems alike, where flock may be a no-op) holding JSON {host, pid, command,
started}. A second process is refused with a UserError naming the holder. A lock left behind by
a process of this host that no longer runs (killed by SIGKILL, out of memory, a power loss) is
taken over with a warning; a lock from another host is honoured, as this host cannot tell
whether that process still runs: the error says which file to delete once it is known to be
gone.

Within one process the lock is re-entrant (`adjax pretrain` computes the centres, which lock
the same folder). With several JAX processes only process 0 takes it: the others write nothing
of the run's own files, and their hosts would refuse each other.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator, Optional

from adjax.errors import PREEMPTED_EXIT_STATUS, UserError

LOCK_NAME = ".adjax.lock"
# A lock file that cannot be read (empty: its writer died between creating and filling it) is
# taken over once it is this old; younger, it may be a lock that is being written right now.
UNREADABLE_GRACE_S = 30.0

log = logging.getLogger("adjax.lock")

# Lock paths this process holds -> how many times (re-entrant holds).
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path(folder: str) -> str:
  return os.path.join(folder, LOCK_NAME)


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():  # a lock of an earlier process that had our pid (a container restart)
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it exists
    return True
  return True


def _read(path: str) -> Optional[dict[str, Any]]:
  """The lock's record, or None when it is unreadable (empty, torn, not JSON)."""
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise
  except (OSError, ValueError):
    return None
  if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
    return None
  return record


def _process(what: str) -> int:
  """jax.process_index() or jax.process_count(); 0 and 1 when JAX is not in use (jax is
  imported by the jobs that lock; it is not imported here for callers that do not use it)."""
  jax = sys.modules.get("jax")
  default = 0 if what == "process_index" else 1
  if jax is None:
    return default
  try:
    return int(getattr(jax, what)())
  except Exception:  # no backend can start: this is one plain process
    return default


def _describe(record: Optional[dict[str, Any]]) -> str:
  if record is None:
    return "an unknown process (the lock file is unreadable)"
  return (f"{record.get('command', '?')} (pid {record.get('pid')} on host "
          f"{record.get('host', '?')}, since {record.get('started', '?')})")


def _create(path: str, record: dict[str, Any]) -> bool:
  """Creates the lock file with `record`; False when it exists already."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(path)
    raise
  return True


def _take_over(path: str, stale: Optional[dict[str, Any]]) -> None:
  """Removes a stale lock, unless another process replaced it meanwhile.

  Renaming is atomic: of two processes that both judged the lock stale, one moves it aside;
  the other then moves (and finds) the first one's fresh lock, which it puts back.
  """
  aside = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # someone else took it over first
    return
  try:
    moved = _read(aside)
  except FileNotFoundError:
    return
  if moved == stale:
    os.remove(aside)
    return
  try:  # not the lock we judged stale: give it back (link: only if none was made since)
    os.link(aside, path)
    os.remove(aside)
  except OSError:
    with contextlib.suppress(OSError):
      os.rename(aside, path)


def acquire(folder: str, command: str) -> str:
  """Takes the lock of `folder` (created if needed) for `command`; returns the lock's path.

  Raises:
    UserError: another live process holds it.
    NotADirectoryError: `folder` is a file.
  """
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
  os.makedirs(folder, exist_ok=True)
  path = lock_path(folder)
  key = os.path.realpath(path)
  with _held_guard:
    if key in _held:
      _held[key] += 1
      return path
  host = socket.gethostname()
  record = {"host": host, "pid": os.getpid(), "command": command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  for _ in range(5):  # a few rounds: each lost race ends in a live holder or a retry
    if _create(path, record):
      with _held_guard:
        _held[key] = 1
      return path
    try:
      holder = _read(path)
      age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:  # released meanwhile
      continue
    if holder is None:
      if age < UNREADABLE_GRACE_S:
        raise UserError(f"{folder} is locked by another process that is starting ({path}); "
                        "try again in a moment")
      log.warning("%s: unreadable lock file %.0f s old; taking it over", path, age)
    elif holder.get("host") != host:
      raise UserError(f"{folder} is in use by {_describe(holder)}: lock {path}. Wait for it "
                      "to finish, or delete the lock once that process is known to be gone")
    elif _pid_alive(int(holder["pid"])):
      raise UserError(f"{folder} is in use by {_describe(holder)}: lock {path}; wait for it "
                      "to finish or use another folder")
    else:
      log.warning("%s: taking over the lock of %s, which no longer runs", path,
                  _describe(holder))
    _take_over(path, holder)
  raise UserError(f"{folder}: could not take the lock {path}; other processes keep taking it")


def release(path: str) -> None:
  """Gives back a lock taken by `acquire` (the file goes with the last re-entrant hold)."""
  key = os.path.realpath(path)
  with _held_guard:
    count = _held.get(key, 0)
    if count > 1:
      _held[key] = count - 1
      return
    _held.pop(key, None)
  try:
    holder = _read(path)
  except FileNotFoundError:
    log.warning("%s: the lock was removed while this process held it", path)
    return
  if holder is not None and (holder.get("host"), holder.get("pid")) != (
      socket.gethostname(), os.getpid()):
    log.warning("%s: the lock is now %s's; left in place", path, _describe(holder))
    return
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


class _Terminated(SystemExit):
  """SIGTERM while a lock is held and nothing else handles it: unwind (releasing the lock)
  with the status a process that SIGTERM ended has, instead of dying with the lock left."""


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
  # Only where SIGTERM would otherwise kill the process outright: a handler already installed
  # (the pretraining loop's, which saves first, or JAX's preemption service) stays in charge.
  # Several processes: JAX's preemption service may own SIGTERM below Python's view of it.
  if _process("process_count") > 1 or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    yield
    return

  def handle(signum, frame):
    log.warning("SIGTERM: stopping and releasing the lock")
    raise _Terminated(PREEMPTED_EXIT_STATUS)

  try:
    previous = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # not the main thread: signals are not ours to handle
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def hold(folder: str, command: str) -> Iterator[Optional[str]]:
  """Holds the lock of `folder` for the block: released however the block ends (an error,
  Ctrl-C, SIGTERM). Yields the lock's path, or None on a JAX process other than 0.

  A folder that the lock created and that is empty afterwards (the job failed before writing
  anything) is removed again.
  """
  if _process("process_index") != 0:
    yield None
    return
  created = not os.path.isdir(folder)
  path = acquire(folder, command)
  try:
    with _exit_on_sigterm():
      yield path
  finally:
    release(path)
    if created:
      with contextlib.suppress(OSError):  # not empty, or gone: either way nothing to tidy
        os.rmdir(folder)
