"""Files written so that a crash never leaves half of one: atomic writes, strict JSON.

Every writer here writes a temporary file in the destination's folder and renames it over the
destination, so a reader sees the old file or the whole new one. NaN and inf become null in
JSON (bare NaN is not JSON: jq, browsers and strict parsers reject it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

from adjax.errors import UserError

log = logging.getLogger("adjax.files")


def one_line(text: object) -> str:
  """`text` with its whitespace runs (newlines included) folded to single spaces."""
  return " ".join(str(text).split())


@functools.lru_cache(maxsize=None)
def _new_file_mode() -> int:
  """The mode open() would give a new file: 0o666 less the umask (read once; os.umask can only
  be read by setting it, so it is set straight back)."""
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


def check_regular_target(path: str) -> None:
  """Refuses a destination that is not a regular file and not absent: a device (/dev/null), a
  folder, a FIFO or a socket, or a symlink to one. Renaming a new file over such a path would
  replace the node itself (as root, /dev/null would become a file) or fail halfway.

  Raises:
    UserError: naming the path and what it is.
  """
  try:
    mode = os.stat(path).st_mode   # follows symlinks: what the path leads to counts
  except FileNotFoundError:        # absent (or a dangling symlink): a new file is made
    return
  except NotADirectoryError:       # under a file: the write fails with ENOTDIR, as it should
    return
  if stat.S_ISREG(mode):
    return
  what = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode)
          or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
          else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
  if os.path.islink(path):
    what = f"a symlink to {what} ({os.path.realpath(path)})"
  from adjax.errors import UserError   # (adjax.errors imports nothing; no cycle)
  raise UserError(f"{path} is {what}; write to a regular file instead")


def atomic_write(path: str, write: Callable[[Any], None], *, binary: bool = True) -> None:
  """Calls `write(f)` on a temporary file beside `path`, then renames it over `path`.

  The file gets the mode a plain open() would give it (mkstemp's are 0600: colleagues on a
  shared file system could not read a run's outputs), and its data reaches the disk before
  the rename, so that after a power loss `path` is either the old file or the whole new one.

  Args:
    path: destination, a regular file or absent (see check_regular_target); its folder is
      created if needed.
    write: writes the content to the open file object it gets.
    binary: open the temporary file in binary (True) or text mode.

  Raises:
    UserError: `path` is a device, folder, FIFO or a symlink to one (nothing is written).
    OSError: the write failed (a full disk, a read-only folder); the temporary file is gone
      and `path` is as it was. The error names `path` when the failing call named no file
      (write() on a full disk does not).
  """
  check_regular_target(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.path.basename(path)}-")
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fchmod(f.fileno(), _new_file_mode())
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as err:
    try:
      os.remove(tmp)
    except OSError:  # already gone; a failure here must not hide the write's own error
      pass
    if isinstance(err, OSError) and err.errno is not None and err.filename is None:
      # (OSError(errno, ...) makes the subclass of that errno, e.g. PermissionError)
      raise OSError(err.errno, err.strerror or os.strerror(err.errno), path) from err
    raise


def without_non_finite(obj: Any) -> Any:
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / jax values
    obj = obj.tolist()
  if isinstance(obj, Mapping):
    return {k: without_non_finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [without_non_finite(v) for v in obj]
  return _finite_or_none(obj)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically; NaN and inf become null (bare NaN is not
  JSON: jq, browsers and strict parsers reject the file)."""
  clean = without_non_finite(obj)
  atomic_write(path, lambda f: json.dump(clean, f, indent=1, sort_keys=False,
                                         default=json_default, allow_nan=False),
               binary=False)


def json_default(value: Any) -> Any:
  # numpy / jax scalars and arrays that end up in metrics.
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str) -> Any:
  """Reads a JSON file, naming the file in the error when it is missing or malformed (binary
  garbage too: the decoder's own message names no file)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"file not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise UserError(f"{path}: not valid JSON ({one_line(err)})") from err


def _finite_or_none(value: Any) -> Any:
  # NaN and inf are not JSON (json.dumps writes bare NaN, which jq and browsers reject).
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    return None
  return value


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
  """Appends one JSON line (metrics logs; an append of one short line needs no rename).
  Non-finite numbers are written as null."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = without_non_finite(dict(record))
  with open(path, "a") as f:
    f.write(json.dumps(record, default=json_default, allow_nan=False) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics log (JSON objects with a numeric "step"), in order.

  Lines that are not such a record (one torn by a kill, a disk that wrote garbage) are
  skipped with one warning naming the file and their line numbers: the log is a record of
  the run, not something it needs in order to go on.
  """
  return _jsonl_lines(path)[0]


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops the lines of a metrics log whose "step" is after `last_step` (a run resumed from
  an earlier checkpoint logs those steps again), atomically; a torn last line and any other
  line that is not a record (see read_jsonl) go too."""
  if not os.path.isfile(path):
    return
  records, lines = _jsonl_lines(path)
  kept = [line for record, line in zip(records, lines) if record["step"] <= last_step]
  atomic_write(path, lambda f: f.writelines(kept), binary=False)


def _jsonl_lines(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """(records, their lines with a newline) of a JSON-lines log; bad lines skipped with a
  warning (the last one unterminated is the usual torn write of a kill: silently)."""
  records: list[dict[str, Any]] = []
  lines: list[str] = []
  bad: list[int] = []
  with open(path, "rb") as f:  # bytes: a garbage line must not stop the lines after it
    raw = f.read().split(b"\n")
  torn_tail = bool(raw) and raw[-1] != b""
  if raw and raw[-1] == b"":
    raw.pop()
  for number, data in enumerate(raw, start=1):
    try:
      record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      record = None
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, (int, float)):
      if data.strip() and not (torn_tail and number == len(raw)):
        bad.append(number)
      continue
    records.append(record)
    lines.append(data.decode("utf-8") + "\n")
  if bad:
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    log.warning("%s: skipped %d line(s) that are not JSON records with a numeric step "
                "(line %s)", path, len(bad), shown)
  return records, lines


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes (hex), read a MiB at a time."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
