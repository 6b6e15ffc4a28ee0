"""Throughput of backbone feature extraction (random weights), one JSON line out.

Usage:
  python benchmarks/bench_backbone.py --backbone efficientnet-lite0,dinov2-base --batch 8 \
      --dtype float32

For each backbone: build it, draw random weights, compile ``extract`` at its input size, run
``--warmup`` untimed calls, then time ``--iters`` calls (blocking on the result of each).
Prints {"benchmark": "backbone", ..., "results": [{"backbone", "images_per_s", ...}, ...]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from adjax.models.backbones import BACKBONES  # pylint: disable=wrong-import-position
from adjax.models.backbones import get_backbone  # pylint: disable=wrong-import-position


def bench_one(name: str, batch: int, dtype: str, iters: int, warmup: int,
              input_size: int | None) -> dict:
  """Time one backbone.

  Args:
    name: registry name.
    batch: images per call.
    dtype: 'float32' or 'bfloat16'.
    iters: timed calls.
    warmup: untimed calls after compilation.
    input_size: override of the input size (None: the backbone's own).

  Returns:
    A dict of measurements.
  """
  overrides = {"input_size": input_size} if input_size else {}
  bb = get_backbone(name, **overrides)
  params = bb.init(jax.random.key(0))
  size = bb.input_size
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)),
                       jnp.float32)
  t0 = time.perf_counter()
  jax.block_until_ready(bb.extract(params, images, dtype=jnp.dtype(dtype)))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(bb.extract(params, images, dtype=jnp.dtype(dtype)))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(bb.extract(params, images, dtype=jnp.dtype(dtype)))
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {"backbone": name, "input_size": size, "images_per_s": round(batch / med, 3),
          "median_batch_s": round(med, 5), "min_batch_s": round(float(min(times)), 5),
          "first_call_s": round(compile_s, 3), "level_dims": list(bb.level_dims),
          "level_strides": list(bb.level_strides)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--backbone", default="efficientnet-lite0",
                      help=f"comma-separated names from {sorted(BACKBONES)}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--input-size", type=int, default=None)
  args = parser.parse_args()
  results = [bench_one(n, args.batch, args.dtype, args.iters, args.warmup, args.input_size)
             for n in args.backbone.split(",") if n]
  dev = jax.devices()[0]
  print(json.dumps({"benchmark": "backbone", "batch": args.batch, "dtype": args.dtype,
                    "iters": args.iters, "platform": dev.platform,
                    "device": getattr(dev, "device_kind", str(dev)),
                    "device_count": jax.device_count(), "results": results}))


if __name__ == "__main__":
  main()
