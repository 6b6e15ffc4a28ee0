"""Angle loss (value + gradients) on a batch split over devices: rows split over the mesh (what
the train step does) vs the whole loss left to the compiler (which gathers the batch and has
every device compute all (2N)^2 similarities).

Prints one JSON line with seconds per call of both, their ratio, and the largest difference of
the loss and gradients. On a CPU, `--devices 8` makes 8 virtual devices (XLA_FLAGS is set
before jax starts) that share the machine's cores: the ratio then shows the work saved.

  python benchmarks/bench_angle_loss.py --devices 8 --tokens 16384 --dim 768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="CPU: virtual devices; 0 = as is")
  parser.add_argument("--tokens", type=int, default=16384, help="N, the global batch's tokens "
                      "per view (batch 32 x 16 x 16 = 8192)")
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--block", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from adjax import sharding
  from adjax.pretrain.step import StepSettings, angle_term

  mesh = sharding.data_mesh()
  if args.tokens % mesh.size:
    raise SystemExit(f"--tokens {args.tokens} must be a multiple of the device count {mesh.size}")
  rng = np.random.default_rng(0)
  rows = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
  e1 = rng.normal(size=(args.tokens, args.dim)).astype(np.float32)
  e2 = (e1 + 0.3 * rng.normal(size=e1.shape)).astype(np.float32)
  labels = (rng.random(args.tokens) < 0.05).astype(np.float32)
  center = (0.1 * rng.normal(size=(args.dim,))).astype(np.float32)
  inputs = [jax.device_put(x, rows) for x in (e1, e2, labels)]
  center = jax.device_put(center, sharding.replicated(mesh))

  base = StepSettings(level_strides=(14,), angle_block_size=args.block)
  results, seconds = {}, {}
  for name, settings in (("row_sharded", dataclasses.replace(base, mesh=mesh)),
                         ("compiler", base)):
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, m, c, s=settings: angle_term(a, b, m, c, s), (0, 1)))
    results[name] = jax.block_until_ready(fn(*inputs, center))
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*inputs, center))
      best = min(best, time.perf_counter() - t0)
    seconds[name] = best
  (loss_a, grads_a), (loss_b, grads_b) = results["row_sharded"], results["compiler"]
  grad_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                  for a, b in zip(grads_a, grads_b))
  print(json.dumps({
      "bench": "angle_loss", "backend": jax.default_backend(), "devices": mesh.size,
      "tokens": args.tokens, "dim": args.dim, "block": args.block,
      "row_sharded_s": round(seconds["row_sharded"], 4),
      "compiler_s": round(seconds["compiler"], 4),
      "speedup": round(seconds["compiler"] / seconds["row_sharded"], 2),
      "loss": float(loss_a), "loss_diff": abs(float(loss_a) - float(loss_b)),
      "grad_max_abs_diff": grad_diff,
      "grad_max_abs": float(max(np.abs(np.asarray(g)).max() for g in grads_b))}))


if __name__ == "__main__":
  main()
