"""Exact 1-NN throughput of adjax's blocked search vs faiss-cpu IndexFlatL2, and coreset time.

Prints one JSON line. Both searches run on the same random bank and queries (float32); the
script checks that they agree (same nearest index, or an equally near one, and the same
squared distance up to float rounding). faiss is a benchmark-only dependency.

  python benchmarks/bench_knn.py                       # 200k x 1024 bank, 2048 queries
  python benchmarks/bench_knn.py --bank 1000000        # docs/method.md's scale (4 GB bank)

The coreset part times PatchCore's greedy k-centre selection (random projection to 128-d,
10 start points, `--coreset-ratio` of `--coreset-bank` points), compile time reported apart.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from adjax.methods import knn


def _time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bank", type=int, default=200_000, help="bank vectors")
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--queries", type=int, default=2048)
  p.add_argument("--query-block", type=int, default=1024)
  p.add_argument("--bank-block", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--coreset-bank", type=int, default=40_000,
                 help="points for the coreset timing (0 skips it)")
  p.add_argument("--coreset-ratio", type=float, default=0.1)
  p.add_argument("--no-faiss", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  rng = np.random.default_rng(args.seed)
  bank = rng.standard_normal((args.bank, args.dim), dtype=np.float32)
  # Queries near bank rows, as test tokens near their normal neighbours.
  near = rng.integers(0, args.bank, args.queries)
  queries = bank[near] + 0.5 * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
  out = {"device": jax.devices()[0].device_kind, "bank": args.bank, "dim": args.dim,
         "queries": args.queries, "query_block": args.query_block,
         "bank_block": args.bank_block}

  bank_j, q_j = jnp.asarray(bank), jnp.asarray(queries)
  search = lambda: knn.nearest_neighbours(q_j, bank_j, k=1, query_block=args.query_block,
                                          bank_block=args.bank_block)
  t = time.perf_counter()
  d_ours, i_ours = jax.block_until_ready(search())
  out["adjax_first_call_s"] = round(time.perf_counter() - t, 3)
  secs = _time(search, args.repeats)
  out["adjax_qps"] = round(args.queries / secs, 1)
  d_ours, i_ours = np.asarray(d_ours)[:, 0], np.asarray(i_ours)[:, 0]

  if not args.no_faiss:
    import faiss
    index = faiss.IndexFlatL2(args.dim)
    index.add(bank)
    d_f, i_f = index.search(queries, 1)
    secs = _time(lambda: index.search(queries, 1), args.repeats)
    out["faiss_qps"] = round(args.queries / secs, 1)
    out["faiss_threads"] = faiss.omp_get_max_threads()
    d_f, i_f = d_f[:, 0], i_f[:, 0]
    same = i_ours == i_f
    # Where the indices differ, both must be (numerically) equally near: check exactly.
    exact = lambda i: ((bank[i].astype(np.float64) - queries) ** 2).sum(-1)
    gap = np.abs(exact(i_ours) - exact(i_f)) / np.maximum(exact(i_f), 1e-12)
    out["index_agreement"] = float(same.mean())
    out["max_rel_gap_where_indices_differ"] = float(gap[~same].max()) if (~same).any() else 0.0
    out["max_rel_dist_diff"] = float(np.max(np.abs(d_ours - d_f) / np.maximum(d_f, 1e-12)))
    out["agree"] = bool(out["max_rel_gap_where_indices_differ"] < 1e-4
                        and out["max_rel_dist_diff"] < 1e-3)

  if args.coreset_bank:
    pts = jnp.asarray(bank[:args.coreset_bank] if args.coreset_bank <= args.bank else
                      rng.standard_normal((args.coreset_bank, args.dim), dtype=np.float32))
    num = max(1, int(args.coreset_bank * args.coreset_ratio))
    key = jax.random.key(args.seed)
    k_proj, k_start = jax.random.split(key)
    t = time.perf_counter()
    proj = jax.block_until_ready(knn._project(pts, knn.random_projection(k_proj, args.dim, 128)))
    t_proj = time.perf_counter() - t
    starts = jax.random.choice(k_start, pts.shape[0], (10,), replace=False)
    t = time.perf_counter()
    compiled = knn.greedy_coreset_from_starts.lower(proj, starts, num=num,
                                                    num_starts=10).compile()
    out["coreset_compile_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    jax.block_until_ready(compiled(proj, starts))
    out["coreset_bank"] = args.coreset_bank
    out["coreset_selected"] = num
    out["coreset_s"] = round(time.perf_counter() - t + t_proj, 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
