"""The screened exact search of adjax.methods.knn: its bfloat16 error bound, its answers
against a float64 brute force (also where the screen cannot vouch for a query), and the
float32 search it falls back to. Every check is against numpy in float64."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.methods import knn

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _brute(q, bank):
  q, bank = q.astype(np.float64), bank.astype(np.float64)
  return ((q[:, None, :] - bank[None]) ** 2).sum(-1)


def _assert_exact(dist, idx, q, bank, k):
  """Indices are the float64 brute force's, except between rows tying to float32 rounding of
  |q|^2 - 2 q.b + |b|^2 (the float32 search's and faiss's form): 2 gamma_D (|q|^2 + |b|^2)."""
  d2 = _brute(q, bank)
  dist, idx = np.asarray(dist), np.asarray(idx)
  want = np.sort(d2, axis=1)[:, :k]
  got = np.take_along_axis(d2, idx, axis=1)
  if k > 1:
    assert (np.diff(np.sort(idx, axis=1), axis=1) != 0).all()   # no row twice
  sq = lambda x: (x.astype(np.float64) ** 2).sum(1)
  tie = 2 * q.shape[1] * 2.0 ** -24 * (sq(q) + sq(bank).max())
  assert (np.abs(got - want) <= tie[:, None]).all()
  np.testing.assert_allclose(dist, want, rtol=1e-5, atol=tie.max())


@pytest.mark.parametrize("passes", [1, 3])
def test_error_bound_covers_the_bfloat16_scores_and_is_tight(passes):
  rng = np.random.default_rng(0)
  dim = 64
  # Random rows, and rows whose every coordinate rounds to bfloat16 the same way (just under
  # a rounding midpoint): errors that do not cancel, the case the bound is written for.
  near_mid = 1 + 0.99 * 2.0 ** -8 + 0.99 * 2.0 ** -16
  q = np.concatenate([rng.standard_normal((20, dim)), np.full((1, dim), near_mid)])
  b = np.concatenate([rng.standard_normal((30, dim)) * 3, np.full((1, dim), near_mid)])
  q, b = q.astype(np.float32), b.astype(np.float32)
  b_sq = jnp.sum(jnp.asarray(b) ** 2, axis=1)
  s = np.asarray(knn._screen_scores(knn._screen_operand(jnp.asarray(q), passes, bank=False),
                                    knn._screen_operand(jnp.asarray(b), passes, bank=True),
                                    b_sq))
  q64, b64 = q.astype(np.float64), b.astype(np.float64)
  truth = (b64 ** 2).sum(1)[None] - 2 * q64 @ b64.T
  q_sq = (q64 ** 2).sum(1)
  bound = np.asarray(knn._score_error_bound(passes, dim, np.sqrt(q_sq),
                                            np.sqrt((b64 ** 2).sum(1).max()), q_sq))
  err = np.abs(s - truth)
  assert (err <= bound[:, None]).all()
  # With the norms of the last pair, the one-term bound is within a factor 2 of the error it
  # is written for; the split's bound is 50 times tighter.
  tight = lambda p: float(knn._score_error_bound(p, dim, np.sqrt(q_sq[-1]),
                                                 np.sqrt((b64[-1] ** 2).sum()), q_sq[-1]))
  if passes == 1:
    assert tight(1) / 2 < err[-1, -1] <= tight(1)
  else:
    assert tight(3) < tight(1) / 50


@pytest.mark.parametrize("k", [1, 3])
def test_search_matches_float64_brute_force(k):
  rng = np.random.default_rng(1)
  bank = rng.standard_normal((700, 48)).astype(np.float32)
  q = (bank[rng.integers(0, 700, 90)] + 0.3 * rng.standard_normal((90, 48))).astype(np.float32)
  dist, idx = knn.nearest_neighbours(jnp.asarray(q), jnp.asarray(bank), k=k, query_block=32,
                                     bank_block=128)
  assert dist.shape == idx.shape == (90, k) and idx.dtype == jnp.int32
  _assert_exact(dist, idx, q, bank, k)


def test_queries_the_screen_cannot_vouch_for_are_searched_again(monkeypatch):
  rng = np.random.default_rng(2)
  dim = 32
  base = rng.standard_normal((40, dim)).astype(np.float32)
  q = (base + 0.3 * rng.standard_normal((40, dim))).astype(np.float32)
  # Each query's nearest row has 5 twins, the j-th pushed away from the query so that its
  # squared distance grows by j x share x |q|^2: more near rows than the screen keeps (k + 3).
  # share 1e-3 (first 20 queries) is below the one-term bound, above the split's; 1e-7 is
  # below both (the float32 search decides).
  away = q - base
  away /= np.linalg.norm(away, axis=1, keepdims=True)
  share = np.where(np.arange(40) < 20, 1e-3, 1e-7)[:, None]
  gap = share * (q * q).sum(1, keepdims=True)
  reach = np.linalg.norm(q - base, axis=1, keepdims=True)
  twins = [base - away * (np.sqrt(reach ** 2 + j * gap) - reach) for j in range(1, 6)]
  bank = np.concatenate([base, *twins, rng.standard_normal((200, dim))]).astype(np.float32)
  qj, bj = jnp.asarray(q), jnp.asarray(bank)
  blocks = dict(query_block=16, bank_block=64)
  _, _, ok1 = knn._screened_search(qj, bj, k=1, passes=1, **blocks)
  d3, i3, ok3 = knn._screened_search(qj, bj, k=1, passes=3, **blocks)
  assert not np.asarray(ok1).any()
  ok3 = np.asarray(ok3)
  assert ok3[:20].all() and not ok3[20:].all()
  _assert_exact(np.asarray(d3)[ok3], np.asarray(i3)[ok3], q[ok3], bank, 1)
  calls = []
  exact = knn._exact_search
  monkeypatch.setattr(knn, "_exact_search", lambda *a, **kw: calls.append(a[0].shape) or
                      exact(*a, **kw))
  dist, idx = knn.nearest_neighbours(qj, bj, k=1, **blocks)
  assert len(calls) == 1 and calls[0][0] >= (~ok3).sum()   # only the unverified, padded
  _assert_exact(dist, idx, q, bank, 1)


def test_float32_search_runs_under_jit_and_without_bfloat16_products(monkeypatch):
  rng = np.random.default_rng(3)
  bank = rng.standard_normal((300, 40)).astype(np.float32)
  q = rng.standard_normal((50, 40)).astype(np.float32)
  jitted = jax.jit(lambda a, b: knn.nearest_neighbours(a, b, k=2, query_block=16,
                                                      bank_block=100))
  _assert_exact(*jitted(jnp.asarray(q), jnp.asarray(bank)), q, bank, 2)
  monkeypatch.setattr(knn.native, "cpu_flags", lambda: frozenset({"avx512f"}))
  assert not knn._screening_pays(q, bank)
  _assert_exact(*knn.nearest_neighbours(jnp.asarray(q), jnp.asarray(bank), k=2), q, bank, 2)


def test_bench_knn_prints_rates_agreement_and_the_coreset_table():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_knn.py"), "--bank",
                         "600", "--dim", "32", "--queries", "64", "--repeats", "2",
                         "--check-queries", "64", "--coreset-sizes", "300,2000",
                         "--coreset-full-max", "100"],
                        capture_output=True, text=True, timeout=300, env=env, check=True)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  out = json.loads(lines[0])
  assert out["adjax_vs_float64"]["exact"] and out["adjax_vs_float64"]["checked"] == 64
  assert len(out["adjax_qps_rounds"]) == 2 and out["adjax_qps"] > 0
  assert [r["points"] for r in out["coreset"]] == [300, 2000]
  assert [r["estimated"] for r in out["coreset"]] == [False, True]
  assert all(r["s"] > 0 and r["selected"] == r["points"] // 10 for r in out["coreset"])
