"""Times the pretraining update on given residual features: projector on both views, angle and
norm losses on every level, backward and Adam update (the part of the step the PyTorch
reference's 11.7 s covers at batch 4, C = 768, 4 levels, 16 x 16 tokens on a 2-core CPU).

Prints one JSON line: images_per_s, seconds per step, model FLOPs (analytic, forward x 3) and
the FLOP rate they imply, and XLA's own FLOP count of the compiled step.

  python benchmarks/bench_step.py --batch 4 --dim 768 --levels 4 --side 16

The speed-up is against the reference's 11.7 s, or, with --measure-reference, against the
PyTorch reference step timed on this machine in the same minutes: a child process
(bench_reference_step.py --serve) runs one reference step between every two adjax steps, never
at the same time. This machine's speed drifts by up to 30 % between hours and moves between
single steps, so only steps timed side by side give a fair ratio.

With --backbone NAME it times the *full* step instead (random backbone weights): backbone on
both views and on max_shots reference images per image, residuals, projector, losses, update,
over every device (the batch is split on the mesh; --batch images per device), e.g. on a GPU:

  python benchmarks/bench_step.py --backbone dinov2-large --batch 32 --dtype bfloat16

and prints the attention implementation (projector.attention, --attention, as resolved here and
why), step time, images/s, model FLOPs (analytic, as benchmarks/scale_model.py counts them) and
the MFU they imply against the device's dense bfloat16 peak where it is known (H100, H200,
TPU v5p), and the peak device memory (device.memory_stats(), where the backend has it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from _step_sizes import add_step_size_arguments, benchmark_masks, step_size_flags


REFERENCE_SECONDS = 11.7   # the reference's step at batch 4, C 768, 4 levels, 16 x 16, 2 cores


def model_flops(batch: int, dim: int, levels: int, side: int, num_ref: int,
                angle_rows: int | None = None) -> float:
  """Forward + backward matmul FLOPs of projector and angle loss.

  angle_rows: None for the dense angle loss the reference computes (2N x 2N similarities,
  forward + backward = 3 x forward); else the rows of the rarer label that adjax's
  single-device angle loss computes against all 2N rows (padded to its block), four matmuls of
  that size (similarities, their recomputation, and the two gradient products)."""
  tokens = 2 * batch * side * side          # both views go through the projector
  per_level = (3 * 2 * num_ref * dim * dim  # reference projection, keys, values (once)
               + 2 * 2 * tokens * dim * dim  # query and output projections
               + 2 * 2 * tokens * num_ref * dim  # attention logits and weighted sum
               + 2 * 2 * tokens * dim * 4 * dim)  # fc1, fc2
  angle = (3 * 2 * tokens * tokens * dim if angle_rows is None
           else 4 * 2 * angle_rows * tokens * dim)
  return levels * (3.0 * per_level + angle)


def minority_rows(masks, settings) -> tuple[float, int]:
  """Share of anomalous tokens per view and the rows the angle loss computes per level."""
  from adjax.losses.angle import rarer_label_block
  from adjax.pretrain.step import level_labels

  labels = np.asarray(level_labels(masks, settings.level_strides[:1],
                                   settings.label_threshold_share)[0][0]).reshape(-1)
  anomalous = int(labels.sum())
  rarer = 2 * min(anomalous, labels.size - anomalous)   # both views
  block = rarer_label_block(labels.size)
  return anomalous / labels.size, -(-rarer // block) * block


def matmul_gflops(dtype, size: int = 2048, repeats: int = 5) -> float:
  """Best rate of a size^3 matmul on the default device, GFLOP/s, through the projector's own
  product (adjax.models.matmul: for bfloat16, float32 accumulation on the matrix units)."""
  from adjax.models.matmul import matmul as projector_matmul

  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: projector_matmul(x, x))
  jax.block_until_ready(matmul(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best / 1e9


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_size_arguments(parser)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--backbone", default="", help="time the full step with this backbone")
  parser.add_argument("--measure-reference", action="store_true",
                      help="also time the PyTorch reference step (bench_reference_step.py, needs "
                      "torch), one reference step before each adjax step, and compare with that "
                      "instead of the 11.7 s figure")
  parser.add_argument("--max-shots", type=int, default=8)
  parser.add_argument("--image-size", type=int, default=0, help="default: the backbone's")
  parser.add_argument("--attention", default="auto",
                      choices=["auto", "dense", "dot_product", "blocked", "native_cpu"],
                      help="projector.attention (adjax/models/reference_attention.py)")
  parser.add_argument("--backbone-dtype", default="same", choices=["same", "float32"],
                      help="the backbone's compute dtype in the full step: that of --dtype, or "
                      "float32 (what adjax/train.py's step passes today: backbone.extract's "
                      "default)")
  args = parser.parse_args()
  if args.backbone:
    return full_step(args)

  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import StepSettings, init_train_state, residual_update

  dtype = jnp.dtype(args.dtype)
  settings = StepSettings(level_strides=(14,) * args.levels, compute_dtype=dtype,
                          attention=args.attention)
  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=1000)
  params = init_projector(jax.random.key(0), [args.dim] * args.levels,
                          num_ref_tokens=args.num_ref)
  state = init_train_state(params, optimizer, jax.random.key(1))
  rng = np.random.default_rng(0)
  shape = (args.batch, args.side, args.side, args.dim)
  res1 = [jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(args.levels)]
  res2 = [r + 0.1 for r in res1]
  masks = jnp.asarray(benchmark_masks(args))
  centers = [jnp.zeros((args.dim,), jnp.float32)] * args.levels

  step = jax.jit(lambda s, a, b, m, c: residual_update(s, a, b, m, c, settings, optimizer),
                 donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, res1, res2, masks, centers).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  # Which attention ran, and whether the native kernel did (its FLOPs are not in xla_gflops).
  from adjax.models.reference_attention import attention_record
  attention = attention_record(args.attention, level_dims=[args.dim] * args.levels,
                               num_heads=settings.num_heads, dtype=dtype)
  native = "adjax_reference_attention_forward" in compiled.as_text()
  state, metrics = compiled(state, res1, res2, masks, centers)   # warm-up
  jax.block_until_ready(metrics["loss"])
  reference = ReferenceSteps(args) if args.measure_reference else None
  times = []
  for _ in range(args.steps):
    if reference is not None:
      reference.step()
    t0 = time.perf_counter()
    state, metrics = compiled(state, res1, res2, masks, centers)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  anomalous_share, angle_rows = minority_rows(masks, settings)
  flops = model_flops(args.batch, args.dim, args.levels, args.side, args.num_ref, angle_rows)
  dense_flops = model_flops(args.batch, args.dim, args.levels, args.side, args.num_ref)
  # The machine's matmul rate drifts between runs here (118-215 GFLOP/s): measure it alongside.
  peak = matmul_gflops(dtype)
  if reference is not None:
    reference = reference.close()
  elif args.dtype == "float32":
    reference = {"seconds_per_step": REFERENCE_SECONDS, "source": "figure"}
  else:   # the 11.7 s figure is the float32 step: no figure for other dtypes
    reference = {"seconds_per_step": None, "source": "none (use --measure-reference)"}
  print(json.dumps({
      "bench": "step", "backend": jax.default_backend(), "devices": jax.device_count(),
      "batch": args.batch, "dim": args.dim, "levels": args.levels, "side": args.side,
      "num_ref": args.num_ref, "dtype": args.dtype, "seconds_per_step": round(seconds, 4),
      "images_per_s": round(args.batch / seconds, 3), "anomalous_share": round(anomalous_share, 4),
      "angle_rows_per_level": angle_rows, "model_gflops": round(flops / 1e9, 1),
      "reference_math_gflops": round(dense_flops / 1e9, 1),
      "gflops_per_s": round(flops / seconds / 1e9, 1),
      "seconds_min": round(min(times), 4), "seconds_max": round(max(times), 4),
      "matmul_gflops_per_s": round(peak, 1),
      "share_of_matmul_rate": round(flops / seconds / 1e9 / peak, 3),
      "xla_gflops": round(xla_flops / 1e9, 1), "compile_s": round(compile_s, 1),
      "attention": attention["implementation"], "attention_reason": attention["reason"],
      "native_kernel_ran": native, "loss": float(metrics["loss"]),
      "reference_seconds_per_step": reference["seconds_per_step"],
      "reference_source": reference["source"],
      "speedup_vs_reference": (round(reference["seconds_per_step"] / seconds, 2)
                               if reference["seconds_per_step"] else None)}))


class ReferenceSteps:
  """The PyTorch reference step in a child process (so that torch's and XLA's thread pools never
  compete), stepped on demand: bench_reference_step.py --serve."""

  def __init__(self, args: argparse.Namespace):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_reference_step.py")
    self._child = subprocess.Popen([sys.executable, script, *step_size_flags(args), "--serve"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    self._expect_ready = True
    self.times: list[float] = []

  def _read_line(self) -> str:
    line = self._child.stdout.readline()
    if not line:
      self._child.wait()
      sys.exit(f"bench_reference_step.py --serve failed: {self._child.stderr.read()[-500:]}")
    return line.strip()

  def step(self) -> None:
    """Runs one reference step and waits for it (the first call also waits for warm-up)."""
    if self._expect_ready:
      if self._read_line() != "ready":
        sys.exit("bench_reference_step.py --serve did not start as expected")
      self._expect_ready = False
    self._child.stdin.write("step\n")
    self._child.stdin.flush()
    self.times.append(float(self._read_line()))

  def close(self) -> dict:
    self._child.stdin.close()
    self._child.wait()
    return {"seconds_per_step": round(float(np.median(self.times)), 4), "source": "interleaved"}


def full_step(args) -> None:
  """The whole compiled pretraining step, sharded over every device."""
  from adjax import sharding
  from adjax.models.backbones import get_backbone
  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import StepSettings, init_train_state, make_train_step

  import functools

  from adjax.models.reference_attention import attention_record
  from scale_model import DEVICES, analytic_flops

  dtype = jnp.dtype(args.dtype)
  mesh = sharding.data_mesh()
  backbone = get_backbone(args.backbone)
  size = args.image_size or backbone.input_size
  settings = StepSettings(level_strides=tuple(backbone.level_strides), compute_dtype=dtype,
                          num_heads=16 if all(c % 16 == 0 for c in backbone.level_dims) else 4,
                          mesh=mesh, attention=args.attention)
  attention = attention_record(args.attention, level_dims=backbone.level_dims,
                               num_heads=settings.num_heads, dtype=dtype)
  backbone_dtype = dtype if args.backbone_dtype == "same" else jnp.float32
  extract = functools.partial(backbone.extract, dtype=backbone_dtype)
  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=1000)
  params = init_projector(jax.random.key(0), backbone.level_dims, num_heads=settings.num_heads,
                          num_ref_tokens=args.num_ref)
  state = sharding.replicate(init_train_state(params, optimizer, jax.random.key(1)), mesh)
  frozen = sharding.replicate({"backbone": backbone.init(jax.random.key(2)),
                               "centers": [jnp.zeros((c,)) for c in backbone.level_dims]}, mesh)
  rng = np.random.default_rng(0)
  b = args.batch * jax.local_device_count()   # this process's share of the global batch
  local = {"view1": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
           "view2": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
           "masks": np.zeros((b, size, size), np.uint8),
           "refs": rng.integers(0, 256, (b, args.max_shots, size, size, 3), dtype=np.uint8),
           "ref_valid": np.ones((b, args.max_shots), bool)}
  local["masks"][0, : size // 4, : size // 4] = 1
  batch = sharding.global_batch(local, mesh)
  step = sharding.jit_data_parallel(
      make_train_step(settings, optimizer, extract), mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, frozen)
  jax.block_until_ready(metrics["loss"])
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  tokens = (size // backbone.level_strides[0]) ** 2
  flop_args = argparse.Namespace(batch=args.batch, max_shots=args.max_shots,
                                 num_ref=args.num_ref, anomalous_share=0.0, image_size=size)
  flops = analytic_flops(flop_args, backbone, "step", tokens, jax.device_count())["total"]
  kind = jax.devices()[0].device_kind
  peak = next((spec["peak"] for name, spec in DEVICES.items()
               if name.replace("TPU ", "").lower() in kind.lower()), None)
  stats = jax.devices()[0].memory_stats() or {}
  print(json.dumps({
      "bench": "full_step", "backend": jax.default_backend(), "devices": jax.device_count(),
      "device_kind": kind, "backbone": args.backbone,
      "image_size": size, "batch_per_device": args.batch, "max_shots": args.max_shots,
      "num_ref": args.num_ref, "dtype": args.dtype,
      "backbone_dtype": jnp.dtype(backbone_dtype).name,
      "attention": attention["implementation"], "attention_reason": attention["reason"],
      "seconds_per_step": round(seconds, 4),
      "images_per_s": round(args.batch * jax.device_count() / seconds, 2),
      "backbone_images_per_s": round(args.batch * jax.device_count() * (2 + args.max_shots)
                                     / seconds, 1),
      "model_tflops_per_device": round(flops / 1e12, 3),
      "tflops_per_s_per_device": round(flops / seconds / 1e12, 2),
      "mfu": round(flops / seconds / peak, 3) if peak else None,
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
      "first_step_s": round(first_s, 1), "loss": float(metrics["loss"])}))


if __name__ == "__main__":
  main()
