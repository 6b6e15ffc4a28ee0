"""JAX's persistent compilation cache for adjax's commands (`train.compilation_cache`).

A run resumed after a preemption, a sweep's next point or an evaluation of another checkpoint
compiles the same programs again (the train step of a large backbone takes minutes on a TPU
pod); with a cache folder they are read back instead. JAX keys each entry by the program, its
compile options, the XLA flags and the jax version, so a stale entry is never used; only
process 0 of a multi-process run writes. Off unless asked for (or set through JAX's own
JAX_COMPILATION_CACHE_DIR).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 30


def use_compilation_cache(folder: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                          min_compile_seconds: float = 1.0) -> bool:
  """Points JAX's persistent compilation cache at `folder` (made if missing).

  Args:
    folder: the cache folder ("" leaves JAX's settings as they are); `~` is expanded. Local
      disk or a shared file system; on a pod, one per host or a shared one.
    max_bytes: the cap, least recently used entries evicted first. It needs the `filelock`
      package, which also locks the folder against concurrent writers; without it the cache
      runs uncapped (and a warning says so).
    min_compile_seconds: programs that compile faster are not stored.

  Returns:
    Whether a folder was set.

  Raises:
    NotADirectoryError / PermissionError: `folder` is a file, or cannot be written.
  """
  if not folder:
    return False
  path = os.path.abspath(os.path.expanduser(str(folder)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"config.train.compilation_cache={folder!r} is a file, not a "
                             "folder")
  os.makedirs(path, exist_ok=True)
  if not os.access(path, os.W_OK):
    raise PermissionError(f"config.train.compilation_cache={folder!r} cannot be written to")
  if importlib.util.find_spec("filelock") is not None:   # JAX locks a capped cache with it
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
  else:
    log.warning("the filelock package is missing: the compilation cache in %s runs without a "
                "size cap or a lock between processes", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  jax.config.update("jax_compilation_cache_dir", path)
  # JAX opens its cache once, at the first compile: start it again on the new folder.
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()
  return True
