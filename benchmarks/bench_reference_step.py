"""The PyTorch reference's pretraining step on given residual features, for a same-machine,
same-hour comparison with `bench_step.py` (this machine's speed drifts by up to 30 % between
hours, so a ratio of two runs minutes apart says more than a ratio to a figure measured once).

The model is `tests/support/torch_reference.py`: docs/method.md's projector in the reference's
layout with its per-image loop (reference tokens, keys and values projected again for every
image), the angle loss with boolean indexing and dense similarities, the norm loss, and torch's
Adam with coupled weight decay: projector on both views, angle + norm(view 1) + norm(view 2) per
level, backward, update. Needs torch (requirements-dev.txt); adjax itself never imports it.
Prints one JSON line.

  python benchmarks/bench_reference_step.py --batch 4 --dim 768 --levels 4 --side 16

With --serve it warms up, prints "ready" and then runs one step for every "step" line it reads
on standard input, answering with that step's seconds: `bench_step.py --measure-reference`
alternates its own steps with these, so both are timed in the same minutes (the machine's speed
moves between single steps here, so even "right afterwards" can be a different speed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from _step_sizes import PATCH, add_step_size_arguments, benchmark_masks

# docs/method.md section 4: a token is anomalous above 32 of 196 pixels.
PATCH_ANOMALOUS_PIXELS = 32


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_size_arguments(parser)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--serve", action="store_true",
                      help='after warm-up print "ready", then time one step per "step" line read '
                      "on stdin and print its seconds")
  args = parser.parse_args()
  try:
    import torch
  except ImportError:
    sys.exit("bench_reference_step.py needs torch: pip install -r requirements-dev.txt")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tests", "support"))
  from torch_reference import Projector, angle_loss_dense, norm_loss

  torch.manual_seed(0)
  model = Projector([args.dim] * args.levels, heads=args.heads, num_ref=args.num_ref)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.dim, args.side, args.side)
  res1 = [torch.tensor(rng.normal(size=shape).astype(np.float32)) for _ in range(args.levels)]
  res2 = [r + 0.1 for r in res1]
  masks = torch.tensor(benchmark_masks(args))[:, None]   # the same masks as bench_step.py
  patch_labels = (torch.nn.functional.avg_pool2d(masks, PATCH) * PATCH * PATCH
                  > PATCH_ANOMALOUS_PIXELS).float().flatten()
  nearest_labels = masks[:, 0, ::PATCH, ::PATCH].flatten()
  center = torch.zeros(args.dim)

  def tokens(x):   # (B, C, H, W) -> (B * H * W, C)
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])

  # bfloat16: torch's mixed precision (float32 parameters, matmuls in bfloat16 on the CPU's
  # matrix units through oneDNN), the counterpart of adjax's compute_dtype.
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def step():
    with autocast:
      out1, out2 = model(res1), model(res2)
      loss = 0.0
      for e1, e2 in zip(out1, out2):
        e1, e2 = tokens(e1), tokens(e2)
        loss = (loss + angle_loss_dense(e1, e2, patch_labels, center)
                + norm_loss(e1, nearest_labels) + norm_loss(e2, nearest_labels))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())

  loss = step()   # warm-up (allocator, lazy init)
  if args.serve:
    return serve(step)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  print(json.dumps({
      "bench": "reference_step", "framework": f"torch {torch.__version__}",
      "threads": torch.get_num_threads(), "batch": args.batch, "dim": args.dim,
      "levels": args.levels, "side": args.side, "num_ref": args.num_ref, "dtype": args.dtype,
      "seconds_per_step": round(seconds, 4), "seconds_min": round(min(times), 4),
      "seconds_max": round(max(times), 4), "images_per_s": round(args.batch / seconds, 3),
      "loss": loss}))


def serve(step) -> None:
  """One timed step per "step" line on stdin, its seconds on stdout; ends at end of input."""
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      sys.exit(f"bench_reference_step.py --serve: expected the line 'step', got {line!r}")
    t0 = time.perf_counter()
    step()
    print(f"{time.perf_counter() - t0:.6f}", flush=True)


if __name__ == "__main__":
  main()
