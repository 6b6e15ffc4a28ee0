"""The error a user can fix: bad flags, a missing file, a bad override or a bad checkpoint.

`adjax.cli` prints such an error as one line on stderr and exits with status 2 (no traceback).
It subclasses ValueError so that library callers can keep catching the usual built-in type.
"""

from __future__ import annotations


class UserError(ValueError):
  """A problem with the user's input (arguments, files, configuration), not a bug."""
