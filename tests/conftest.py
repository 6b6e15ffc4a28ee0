"""Test settings: CPU only, and keep XLA from grabbing every core per test process."""
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (the train step of the tiny run, in the test process
# and again in the runs tests start as subprocesses): JAX's persistent compilation cache shares
# them between both xdist workers and those subprocesses (they inherit this environment),
# which takes about a quarter off test_train.py. Set before jax is imported. A size cap makes
# JAX lock the cache with filelock; without the lock, two processes writing one entry could
# leave a torn file for a third to read, so no lock, no cache. Entries are keyed by the
# program, the jax version and the XLA flags, not by the CPU: the folder is named after this
# CPU's model and features, so that a checkout shared between machines never loads code built
# for another CPU. A checkout that cannot be written to runs without the cache.
def _compilation_cache_dir():
  import hashlib
  import importlib.util
  import platform
  if importlib.util.find_spec("filelock") is None:
    return None
  try:
    with open("/proc/cpuinfo") as f:
      cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
  except OSError:
    cpu = platform.processor()
  name = hashlib.sha256(f"{platform.machine()} {cpu}".encode()).hexdigest()[:12]
  folder = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / f"jax_cache_{name}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  return str(folder) if os.access(folder, os.W_OK) else None


_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or _compilation_cache_dir()
if _CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Helpers the tests import by name (run_helpers, torch_reference, ...).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "support"))

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
