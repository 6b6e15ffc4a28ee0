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
# program, the jax version and the XLA flags: a stale one is never used.
try:
  import filelock  # noqa: F401
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
      pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"))
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
except ImportError:
  pass
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
