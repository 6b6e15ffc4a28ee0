"""Timing helpers shared by the benchmark scripts (not a benchmark itself: `adjax bench` skips
names that start with "_")."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax


def best_ms(fn: Callable[..., Any], args: Sequence[Any], repeats: int) -> float:
  """Fastest of `repeats` calls of fn(*args) in milliseconds, after one untimed call (compile
  and warm-up); each call waits for its results."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3
