"""Exact 1-NN throughput of adjax's search vs faiss-cpu IndexFlatL2, and the coreset's cost.

Prints one JSON line. Both searches run on the same random bank and queries (float32), timed
alternately in the same process (`--repeats` rounds of one adjax search then one faiss search;
medians and every round reported), so that a neighbour's load on a shared machine hits both.
Agreement is checked against a float64 brute force on `--check-queries` queries: the same
nearest index, or one whose float64 distance ties to float32 rounding (relative 1e-6), and
distances within 1e-4 relative. faiss is a benchmark-only dependency.

  python benchmarks/bench_knn.py                       # 200k x 1024 bank, 2048 queries
  python benchmarks/bench_knn.py --bank 1000000        # a 4 GB bank
  python benchmarks/bench_knn.py --with-float32        # also time adjax's float32 search

The coreset part times PatchCore's greedy k-centre selection (random projection to 128-d,
10 start points, `--coreset-ratio` of N points, as PatchCore's defaults) for each N of
`--coreset-sizes`, compile time apart. A greedy step costs the same whatever its number, so
where a run would select more than `--coreset-full-max` points, runs of 500 and 2000 steps
give the per-step time and the total is start-distance time + selected x per-step time
(`"estimated": true`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adjax.methods import knn


def _seconds(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _agreement(bank, queries, dist, idx, rows) -> dict:
  """Indices and distances of `rows` queries against a float64 brute force."""
  b64 = bank.astype(np.float64)
  b_sq = (b64 * b64).sum(1)
  want_i, want_d = [], []
  for start in range(0, len(rows), 64):
    q = queries[rows[start:start + 64]].astype(np.float64)
    d = (q * q).sum(1)[:, None] - 2 * q @ b64.T + b_sq[None]
    want_i.append(d.argmin(1))
  want_i = np.concatenate(want_i)
  exact = lambda i: ((b64[i] - queries[rows].astype(np.float64)) ** 2).sum(-1)
  want_d, got_d = exact(want_i), exact(idx[rows])
  same = idx[rows] == want_i
  tie_gap = np.abs(got_d - want_d) / np.maximum(want_d, 1e-30)
  dist_err = np.abs(dist[rows] - want_d) / np.maximum(want_d, 1e-30)
  return {"checked": len(rows), "same_index": float(same.mean()),
          "max_rel_gap_where_indices_differ": float(tie_gap[~same].max()) if (~same).any()
          else 0.0,
          "max_rel_dist_err": float(dist_err.max()),
          "exact": bool((same | (tie_gap < 1e-6)).all() and dist_err.max() < 1e-4)}


def _coreset_time(pts: jax.Array, num: int, seed: int) -> tuple[float, float]:
  """(seconds of projection + selection, compile seconds) of one greedy coreset run."""
  key = jax.random.key(seed)
  k_proj, k_start = jax.random.split(key)
  t = time.perf_counter()
  proj = jax.block_until_ready(knn._project(pts, knn.random_projection(k_proj, pts.shape[1],
                                                                       128)))
  t_proj = time.perf_counter() - t
  starts = jax.random.choice(k_start, pts.shape[0], (10,), replace=False)
  t = time.perf_counter()
  compiled = knn.greedy_coreset_from_starts.lower(proj, starts, num=num,
                                                  num_starts=10).compile()
  t_compile = time.perf_counter() - t
  return _seconds(lambda: compiled(proj, starts)) + t_proj, t_compile


def _coreset_table(args, rng) -> list[dict]:
  rows = []
  for n in args.coreset_sizes:
    pts = jnp.asarray(rng.standard_normal((n, args.dim), dtype=np.float32))
    num = max(1, int(n * args.coreset_ratio))
    row = {"points": n, "selected": num}
    if num <= args.coreset_full_max:
      row["s"], row["compile_s"] = _coreset_time(pts, num, args.seed)
      row["estimated"] = False
    else:
      t_a, c_a = _coreset_time(pts, 500, args.seed)
      t_b, c_b = _coreset_time(pts, 2000, args.seed)
      step = (t_b - t_a) / 1500
      row["s_per_step"] = step
      row["s"] = t_a - 500 * step + num * step
      row["compile_s"] = max(c_a, c_b)
      row["estimated"] = True
    # Seconds per point per selected point: the O(N k) constant.
    row["ns_per_point_step"] = 1e9 * row["s"] / (n * num)
    rows.append({key: round(v, 6) if isinstance(v, float) else v for key, v in row.items()})
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bank", type=int, default=200_000, help="bank vectors")
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--queries", type=int, default=2048)
  p.add_argument("--query-block", type=int, default=2048, help="as PatchCore's default")
  p.add_argument("--bank-block", type=int, default=16384, help="as PatchCore's default")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--check-queries", type=int, default=256,
                 help="queries checked against the float64 brute force")
  p.add_argument("--with-float32", action="store_true",
                 help="also time adjax's float32 search (the one run where the CPU lacks "
                 "bfloat16 products, under jit, and off the CPU)")
  p.add_argument("--coreset-sizes", type=lambda s: [int(x) for x in s.split(",") if x],
                 default=[10_000, 40_000, 300_000],
                 help="comma-separated N for the coreset table (empty skips it)")
  p.add_argument("--coreset-ratio", type=float, default=0.1)
  p.add_argument("--coreset-full-max", type=int, default=4000)
  p.add_argument("--no-faiss", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  rng = np.random.default_rng(args.seed)
  bank = rng.standard_normal((args.bank, args.dim), dtype=np.float32)
  # Queries near bank rows, as test tokens near their normal neighbours.
  near = rng.integers(0, args.bank, args.queries)
  queries = bank[near] + 0.5 * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
  out = {"bench": "knn", "device": jax.devices()[0].device_kind, "bank": args.bank,
         "dim": args.dim, "queries": args.queries, "query_block": args.query_block,
         "bank_block": args.bank_block,
         "screened": knn._screening_pays(jnp.zeros((1, 1)), jnp.zeros((1, 1)))}

  bank_j, q_j = jnp.asarray(bank), jnp.asarray(queries)
  blocks = dict(query_block=args.query_block, bank_block=args.bank_block)
  searches = {"adjax": lambda: knn.nearest_neighbours(q_j, bank_j, k=1, **blocks)}
  if args.with_float32:
    searches["adjax_float32"] = lambda: knn._exact_search(q_j, bank_j, k=1, **blocks)
  if not args.no_faiss:
    import faiss
    index = faiss.IndexFlatL2(args.dim)
    index.add(bank)
    searches["faiss"] = lambda: index.search(queries, 1)
    out["faiss_threads"] = faiss.omp_get_max_threads()
  results = {}
  for name, fn in searches.items():   # first calls: compilation, faiss's thread pool
    t = time.perf_counter()
    results[name] = jax.block_until_ready(fn())
    out[f"{name}_first_call_s"] = round(time.perf_counter() - t, 3)
  rates = {name: [] for name in searches}
  for _ in range(args.repeats):
    for name, fn in searches.items():
      rates[name].append(round(args.queries / _seconds(fn), 1))
  for name, r in rates.items():
    out[f"{name}_qps"] = statistics.median(r)
    out[f"{name}_qps_rounds"] = r
  if "faiss" in rates:
    out["adjax_over_faiss"] = [round(a / f, 2) for a, f in zip(rates["adjax"], rates["faiss"])]
  if out["screened"]:
    # Share of queries the bfloat16 pass alone vouched for (the rest are searched again).
    _, _, ok = knn._screened_search(q_j, bank_j, k=1, passes=1,
                                    query_block=min(args.query_block, knn._SCREEN_QUERY_BLOCK),
                                    bank_block=min(args.bank_block, knn._SCREEN_BANK_BLOCK))
    out["screen_verified_share"] = float(np.mean(ok))

  rows = rng.choice(args.queries, min(args.check_queries, args.queries), replace=False)
  for name, res in results.items():
    d, i = (np.asarray(x)[:, 0] for x in res[:2])
    if name == "faiss":   # faiss returns (distances, indices) as numpy, int64
      i = i.astype(np.int64)
    out[f"{name}_vs_float64"] = _agreement(bank, queries, d, i, rows)

  if args.coreset_sizes:
    out["coreset_ratio"] = args.coreset_ratio
    out["coreset"] = _coreset_table(args, rng)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
