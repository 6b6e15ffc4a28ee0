"""How the library's log messages reach a terminal while an `adjax` command runs: one plain
line each on stderr, above any progress bar."""

from __future__ import annotations

import contextlib
import logging
import sys


class _StderrLines(logging.Handler):
  """Writes records as lines on stderr, above any progress bar (tqdm.write)."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      from tqdm import tqdm
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001 (logging's own contract: report, do not raise)
      self.handleError(record)


class _PlainInfo(logging.Formatter):
  """`adjax.part: message` for information, `adjax.part: warning: message` above it."""

  def format(self, record: logging.LogRecord) -> str:
    level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
    return f"{record.name}: {level}{record.getMessage()}"


@contextlib.contextmanager
def library_messages_on_stderr():
  """The library's info messages (a run resumed, an evaluation continued) and warnings on
  stderr, each once, while a command runs: otherwise info is dropped, and warnings go to
  whatever handler the imports left on the root logger (orbax and grain install one). The
  "adjax" logger is restored afterwards; a command run inside another keeps the outer setup."""
  logger = logging.getLogger("adjax")
  if any(isinstance(h, _StderrLines) for h in logger.handlers):
    yield
    return
  saved = (logger.level, logger.propagate)
  handler = _StderrLines()
  handler.setFormatter(_PlainInfo())
  logger.addHandler(handler)
  if logger.getEffectiveLevel() > logging.INFO:   # a caller's DEBUG stays
    logger.setLevel(logging.INFO)
  logger.propagate = False
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
