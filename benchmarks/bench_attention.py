"""The projector's reference attention of one level on its own: forward, and forward + backward,
for one implementation and dtype (the figures the README quotes for the native kernel).

Prints one JSON line: milliseconds per call (best of --repeats), the FLOP rate of the two
products of the forward pass and of the seven of forward + backward (the backward recomputes
the logits, then dp, dq, dk, dv), the implementation `--attention` resolved to and why
(adjax.models.reference_attention.resolve_attention), and which handler ran: "native_cpu"
(the kernel's float32 handlers), "native_cpu_amx" (bfloat16 on the tile unit), "cudnn"
(cuDNN's fused attention) or "xla" (XLA's own code).

  python benchmarks/bench_attention.py --dtype bfloat16 --attention native_cpu
  python benchmarks/bench_attention.py --dtype float32 --attention blocked
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from _timing import best_ms


def main() -> None:
  from adjax.models.reference_attention import (IMPLEMENTATIONS, reference_attention,
                                                resolve_attention)

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--queries", type=int, default=2048, help="tokens of both views: "
                      "2 x batch 4 x 16 x 16")
  parser.add_argument("--refs", type=int, default=2048, help="reference tokens (keys)")
  parser.add_argument("--dim", type=int, default=48, help="head width (768 / 16)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                      help="projector.attention: the implementation to time")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (args.heads, args.queries, args.dim), dtype)
  k = jax.random.normal(keys[1], (args.heads, args.refs, args.dim), dtype)
  v = jax.random.normal(keys[2], (args.heads, args.refs, args.dim), dtype)
  d_out = jax.random.normal(keys[3], (args.heads, args.queries, args.dim), dtype)

  def attention(q, k, v):
    return reference_attention(q, k, v, implementation=args.attention)

  forward = jax.jit(attention)
  both = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v)[1](d_out))
  program = both.lower(q, k, v).as_text()
  resolved, reason = resolve_attention(args.attention, num_heads=args.heads,
                                       head_dim=args.dim, dtype=dtype)
  handler = ("native_cpu_amx" if "adjax_reference_attention_forward_amx" in program
             else "native_cpu" if "adjax_reference_attention_forward" in program
             else "cudnn" if "cudnn" in program.lower() else "xla")
  forward_ms = best_ms(forward, (q, k, v), args.repeats)
  both_ms = best_ms(both, (q, k, v), args.repeats)
  product = 2.0 * args.heads * args.queries * args.refs * args.dim
  print(json.dumps({
      "bench": "attention", "backend": jax.default_backend(), "heads": args.heads,
      "queries": args.queries, "refs": args.refs, "dim": args.dim, "dtype": args.dtype,
      "requested": args.attention, "attention": resolved, "attention_reason": reason,
      "handler": handler,
      "forward_ms": round(forward_ms, 2), "forward_backward_ms": round(both_ms, 2),
      "forward_gflops_per_s": round(2 * product / forward_ms / 1e6, 1),
      "forward_backward_gflops_per_s": round(7 * product / both_ms / 1e6, 1)}))


if __name__ == "__main__":
  main()
