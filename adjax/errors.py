"""The error a user can fix (bad flags, a missing file, a bad override or a bad checkpoint),
and the preemption signal a job must pass on.

`adjax.cli` prints a UserError as one line on stderr and exits with status 2 (no traceback).
It subclasses ValueError so that library callers can keep catching the usual built-in type.
"""

from __future__ import annotations


class UserError(ValueError):
  """A problem with the user's input (arguments, files, configuration), not a bug."""


# The exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, as a shell reports
# a process the signal ended): schedulers treat 0 as "finished" and would never resume it.
PREEMPTED_EXIT_STATUS = 143


class Preempted(Exception):
  """A pretraining run saved its state and stopped on SIGTERM before its last step."""
