"""Builds, loads and registers adjax's native CPU kernels (XLA FFI handlers written in C++).

Imported only when `projector.attention="native_cpu"` is asked for (see
adjax/models/reference_attention.py): no other path builds, probes or loads the kernel.

A kernel's source ships in this folder; the first process that needs it compiles it with the
machine's C++ compiler against the FFI headers of the installed jaxlib, into a cache folder
(`$ADJAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/adjax/kernels`, else `~/.cache/adjax/kernels`),
named by a digest of the source, the flags and the jaxlib version, so an edit or an upgrade
builds anew and a stale library is never loaded. The library is written under a temporary name
and renamed into place, so processes building at once (test workers, hosts on a shared disk)
never load a half-written file.

Where the CPU lacks the instructions, no compiler is found or the build fails, `available()` is
False and `unavailable_reason()` says why (the attention then refuses "native_cpu" with it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("reference_attention_cpu.cc")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512dq", "fma")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mavx512dq", "-mfma", "-shared", "-fPIC")
# Handler symbol in the library -> FFI target name.
TARGETS = {
    "AdjaxReferenceAttentionForward": "adjax_reference_attention_forward",
    "AdjaxReferenceAttentionBackward": "adjax_reference_attention_backward",
    "AdjaxReferenceAttentionForwardAmx": "adjax_reference_attention_forward_amx",
    "AdjaxReferenceAttentionBackwardAmx": "adjax_reference_attention_backward_amx",
}
# The AMX handlers (bfloat16 operands) also need these, and Linux's permission for the tiles.
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl")
_LOAD_LOCK = threading.Lock()   # two threads tracing at once build and register once


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is absent); read
  once, since every trace of the attention asks (amx_available)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    if line.startswith("flags"):
      return frozenset(line.split(":", 1)[1].split())
  return frozenset()


def cache_folder() -> Path:
  if os.environ.get("ADJAX_KERNEL_CACHE"):
    return Path(os.environ["ADJAX_KERNEL_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "adjax" / "kernels"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    path = shutil.which(name) if name else None
    if path:
      return path
  return None


def _library_name(source_text: bytes) -> str:
  import jaxlib
  digest = hashlib.sha256(source_text + " ".join(COMPILE_FLAGS).encode()
                          + jaxlib.__version__.encode()).hexdigest()[:16]
  return f"{SOURCE.stem}-{digest}.so"


def build(folder: Path | None = None) -> Path:
  """The compiled library, built now unless the cache already holds it.

  Raises:
    RuntimeError: no C++ compiler, or the compiler failed (its message included).
  """
  source_text = SOURCE.read_bytes()
  folder = Path(folder) if folder is not None else cache_folder()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
      raise PermissionError(folder)
  except OSError:   # a read-only home: build for this process only
    folder = Path(tempfile.mkdtemp(prefix="adjax-kernels-"))
  library = folder / _library_name(source_text)
  if library.exists():
    return library
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
  partial = folder / f".{library.name}.{os.getpid()}.tmp"
  command = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o",
             str(partial)]
  log.info("building %s (once per source and jaxlib version; ~10 s)", library)
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    partial.unlink(missing_ok=True)
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
  os.replace(partial, library)
  return library


@functools.cache
def _load() -> str | None:
  """Registers the kernels with XLA; returns why not where they cannot be used, else None."""
  if platform.machine() not in ("x86_64", "AMD64"):
    return f"the CPU is {platform.machine()}, not x86-64"
  missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
  if missing:
    return f"the CPU lacks {', '.join(missing)}"
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as error:
    # A machine that could run the kernels but did not build them is worth a warning.
    log.warning("native CPU kernels could not be built or loaded: %s", error)
    return f"the kernel library could not be built or loaded: {error}"
  for symbol, target in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  _LOADED.append(library)
  return None


_LOADED: list[ctypes.CDLL] = []   # the library _load registered, for amx_available


def available() -> bool:
  """Whether the native CPU kernels are registered (built on first call); logs why not once."""
  with _LOAD_LOCK:
    reason = _load()
  if reason is not None:
    _log_unavailable_once(reason)
  return reason is None


def unavailable_reason() -> str | None:
  """Why the native CPU kernels cannot run here (None: they can; built on first call)."""
  with _LOAD_LOCK:
    return _load()


def amx_available() -> bool:
  """Whether the AMX handlers can run here: the kernels are available, the CPU has AMX with
  bfloat16 (and AVX512-BF16 for the conversions between the tile products), and Linux granted
  this process the tile registers. Elsewhere bfloat16 operands use the float32 handlers."""
  if not available() or not all(flag in cpu_flags() for flag in AMX_CPU_FLAGS):
    return False
  return _amx_permission()


@functools.cache
def _amx_permission() -> bool:
  granted = bool(_LOADED[-1].AdjaxAmxReady())
  if not granted:
    log.info("Linux did not grant this process the AMX tile registers: the float32 kernel runs")
  return granted


@functools.cache
def _log_unavailable_once(reason: str) -> None:
  log.info("native CPU kernels cannot run here: %s", reason)
