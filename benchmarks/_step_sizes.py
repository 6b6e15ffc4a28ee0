"""The problem sizes and pixel masks that bench_step.py and bench_reference_step.py share, so
that the PyTorch reference is always timed on exactly the problem of the adjax step it is
compared with (not a benchmark itself: `adjax bench` skips names that start with "_")."""

from __future__ import annotations

import argparse

import numpy as np

# name, default: batch 4, C 768, 4 levels, 16 x 16 tokens, 2,048 reference tokens.
STEP_SIZES = (("batch", 4), ("dim", 768), ("levels", 4), ("side", 16), ("num-ref", 2048))
PATCH = 14   # pixels per token side


def add_step_size_arguments(parser: argparse.ArgumentParser) -> None:
  for name, default in STEP_SIZES:
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument(
      "--dtype", default="float32", choices=["float32", "bfloat16"],
      help="compute dtype (parameters stay float32); bfloat16 is the paper's recipe. The PyTorch "
      "reference runs it under torch.autocast, as mixed-precision PyTorch training does")
  parser.add_argument(
      "--anomalous-share", type=float, default=None,
      help="share of each view's tokens whose patches are anomalous (whole patches, in raster "
      "order over the batch); default: the top-left third of image 0 (36 of 1,024 tokens at "
      "batch 4, 16 x 16). The angle loss's work grows with the rarer label's share.")


def step_size_flags(args: argparse.Namespace) -> list[str]:
  """The parsed sizes as command-line flags again (for a child benchmark)."""
  flags = []
  for name, _ in STEP_SIZES:
    flags += [f"--{name}", str(getattr(args, name.replace("-", "_")))]
  flags += ["--dtype", args.dtype]
  if args.anomalous_share is not None:
    flags += ["--anomalous-share", repr(args.anomalous_share)]
  return flags


def benchmark_masks(args: argparse.Namespace) -> np.ndarray:
  """(batch, side * 14, side * 14) float32 pixel masks of the benchmark batch."""
  if args.anomalous_share is None:
    size = args.side * PATCH
    masks = np.zeros((args.batch, size, size), np.float32)
    masks[0, :size // 3, :size // 3] = 1
    return masks
  if not 0.0 <= args.anomalous_share <= 1.0:
    raise SystemExit(f"--anomalous-share {args.anomalous_share}: expected a share in [0, 1]")
  tokens = np.zeros(args.batch * args.side * args.side, np.float32)   # raster order
  tokens[:round(args.anomalous_share * tokens.size)] = 1
  grid = tokens.reshape(args.batch, args.side, args.side)
  return grid.repeat(PATCH, axis=1).repeat(PATCH, axis=2)
