"""The problem sizes that bench_step.py and bench_reference_step.py share, so that the PyTorch
reference is always timed at exactly the sizes of the adjax step it is compared with (not a
benchmark itself: `adjax bench` skips names that start with "_")."""

from __future__ import annotations

import argparse

# name, default: batch 4, C 768, 4 levels, 16 x 16 tokens, 2,048 reference tokens.
STEP_SIZES = (("batch", 4), ("dim", 768), ("levels", 4), ("side", 16), ("num-ref", 2048))


def add_step_size_arguments(parser: argparse.ArgumentParser) -> None:
  for name, default in STEP_SIZES:
    parser.add_argument(f"--{name}", type=int, default=default)


def step_size_flags(args: argparse.Namespace) -> list[str]:
  """The parsed sizes as command-line flags again (for a child benchmark)."""
  flags = []
  for name, _ in STEP_SIZES:
    flags += [f"--{name}", str(getattr(args, name.replace("-", "_")))]
  return flags
