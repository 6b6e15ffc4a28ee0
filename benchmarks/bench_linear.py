"""One linear layer's forward + backward (output, input gradient, weight gradient) through the
projector's product (adjax.models.matmul) and through plain autodiff of `x @ w`, same dtype.

Prints one JSON line with milliseconds per call of both (best of --repeats) and their FLOP
rates (three products). In bfloat16 on a CPU with AMX, `matmul` runs all three on the tile
unit (see adjax/models/matmul.py); plain autodiff gets bfloat16-result products, which XLA
widens to float32.

  python benchmarks/bench_linear.py --tokens 2048 --dim-in 768 --dim-out 3072 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from _timing import best_ms


def main() -> None:
  from adjax.models.matmul import matmul

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--dim-in", type=int, default=768)
  parser.add_argument("--dim-out", type=int, default=3072)
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (args.tokens, args.dim_in), dtype)
  w = (jax.random.normal(keys[1], (args.dim_in, args.dim_out)) / args.dim_in ** 0.5).astype(dtype)
  d_y = jax.random.normal(keys[2], (args.tokens, args.dim_out), dtype)

  def layer(product):
    return jax.jit(lambda x, w: jax.vjp(product, x, w)[1](d_y))

  ours_ms = best_ms(layer(matmul), (x, w), args.repeats)
  plain_ms = best_ms(layer(lambda a, b: a @ b), (x, w), args.repeats)
  flops = 3 * 2.0 * args.tokens * args.dim_in * args.dim_out
  print(json.dumps({
      "bench": "linear", "backend": jax.default_backend(), "tokens": args.tokens,
      "dim_in": args.dim_in, "dim_out": args.dim_out, "dtype": args.dtype,
      "matmul_ms": round(ours_ms, 2), "plain_ms": round(plain_ms, 2),
      "matmul_gflops_per_s": round(flops / ours_ms / 1e6, 1),
      "plain_gflops_per_s": round(flops / plain_ms / 1e6, 1)}))


if __name__ == "__main__":
  main()
