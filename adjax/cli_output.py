"""What the `adjax` command prints: results as strict JSON on stdout, and the one-line message
of an error the user can fix (see adjax/cli.py)."""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
from typing import Any, Mapping

from adjax.io import files


def _summarised(value: Any) -> Any:
  # Arrays (centres, feature banks) are summarised, not dumped: a 1024-d centre per level is
  # not something to read on a terminal.
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    if getattr(value, "ndim", 0) == 0:
      return _strict(value.item())
    return {"shape": list(value.shape), "dtype": str(value.dtype)}
  return str(value)


def _strict(value: Any) -> Any:
  """`value` with every NaN and infinity made null (recursively) and every value JSON has no
  type for summarised: bare NaN is not JSON, and jq or a strict parser reading a run's
  summary from stdout would reject the whole line."""
  if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _strict(v)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  if isinstance(value, (numbers.Integral, numbers.Real)) and not hasattr(value, "shape"):
    return _strict(int(value) if isinstance(value, numbers.Integral) else float(value))
  return _strict(_summarised(value)) if hasattr(value, "shape") else str(value)


def print_json(obj: Any) -> None:
  """Prints a command's result: dicts and lists as one line of strict JSON, else as text."""
  if obj is None:
    return
  if isinstance(obj, (dict, list)):
    print(json.dumps(_strict(obj), allow_nan=False))
  else:
    print(obj)


# OS errors the user can act on (free space, pick another --out, fix permissions): one line
# and exit 2. Other OS errors (EIO, EBADF, ...) keep their traceback.
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EEXIST,
                          errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                          errno.ENOENT, errno.ENAMETOOLONG})
# Raised by adjax itself with a message of its own (and no errno): one line too.
_USER_OSERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                  FileExistsError)


def user_error_message(err: BaseException) -> str | None:
  """The one-line message of an error the user can fix, or None for one that is a bug."""
  if not isinstance(err, OSError):
    return files.one_line(err)
  if err.errno in _USER_ERRNOS:
    reason = err.strerror or os.strerror(err.errno)
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    # "<path>: <reason>", as the shell's tools say it; a rename names both paths.
    return files.one_line(f"{' -> '.join(names)}: {reason}" if names else reason)
  if err.errno is None and isinstance(err, _USER_OSERRORS):
    return files.one_line(err)
  return None
