"""Per-device memory, FLOPs and communication of the whole pretraining step at scale, and a
*projected* step time on H100, H200 and TPU v5p, from compiling the step for virtual CPU devices.

For each backbone and reference setting (references through the backbone in the step, or the
precomputed reference bank, train.precomputed_refs) it compiles the step of adjax/train.py
(jax.jit over a data-parallel mesh, batch split, state and weights replicated) for N virtual
CPU devices (the script re-runs itself with XLA_FLAGS=--xla_force_host_platform_device_count=N;
nothing is allocated: abstract jax.ShapeDtypeStruct arguments, no weights) and prints one JSON
line with:

* memory per device (compiled.memory_analysis(): arguments, outputs, temporaries, as XLA:CPU
  assigns buffers: a GPU or TPU compile fuses differently; a proxy, not a measurement);
* FLOPs per device and step: XLA's count (compiled.cost_analysis(), which counts a loop body
  once: the angle loss's loop is undercounted) beside an analytic count (backbone forward on
  both views and the reference images, residual matching, projector forward + backward, the
  angle loss's rarer-label similarities);
* bytes each collective moves per device and step, from the compiled HLO (all-reduce,
  all-gather, reduce-scatter, collective-permute operand sizes; ring algorithms: all-reduce
  2 (n-1)/n S, all-gather and reduce-scatter (n-1)/n of the gathered size);
* a PROJECTED step time (analytic FLOPs / (peak x --mfu) + collective bytes / link bandwidth,
  not overlapped) and time to 10 epochs of RealIAD (151,050 images), for the devices below.

Assumed devices (dense bfloat16 peak; link per device and direction): H100 and H200 989
TFLOP/s, NVLink 450 GB/s inside a node of 8, 50 GB/s (400 Gb/s InfiniBand per GPU) beyond 8
devices; TPU v5p 459 TFLOP/s, ICI 600 GB/s per chip (the brief's figure: 4 links of ~150 GB/s
per direction in use), 4 chips per host. HBM: H100 80 GB, H200 141 GB, v5p 95 GB.

--compile-devices M (< --devices N) compiles at M devices and scales to N: in data parallel the
per-device program is the same except the angle loss, whose columns are every device's rows
(all-gathered: (2 x N x batch x tokens, C) float32 per level, and as much again for their
gradient, reduce-scattered): those buffers and the gather/scatter bytes are scaled by N / M,
the rest kept (labelled "extrapolated_from_devices").

  python benchmarks/scale_model.py --backbone dinov2-base --devices 8 --batch 32
  python benchmarks/scale_model.py --backbone dinov2-large --devices 256 --compile-devices 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

REALIAD_IMAGES = 151_050
EPOCHS = 10
GROUPS = 150          # RealIAD: 30 classes x 5 views, the reference bank's groups
DEVICES = {
    # name: bfloat16 peak FLOP/s, link bytes/s inside a node, beyond it, node size, HBM bytes
    "H100": dict(peak=989e12, link=450e9, link_beyond=50e9, node=8, hbm=80e9),
    "H200": dict(peak=989e12, link=450e9, link_beyond=50e9, node=8, hbm=141e9),
    "TPU v5p": dict(peak=459e12, link=600e9, link_beyond=600e9, node=4, hbm=95e9),
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="dinov2-base",
                      help="comma-separated names of adjax.models.backbones (ViTs)")
  parser.add_argument("--devices", default="8", help="comma-separated device counts")
  parser.add_argument("--compile-devices", type=int, default=0,
                      help="compile at this many devices and scale to --devices (0: compile at "
                      "--devices)")
  parser.add_argument("--batch", type=int, default=32, help="images per device")
  parser.add_argument("--max-shots", type=int, default=8)
  parser.add_argument("--num-ref", type=int, default=2048)
  parser.add_argument("--num-heads", type=int, default=16)
  parser.add_argument("--image-size", type=int, default=0, help="default: the backbone's")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--refs", default="both", choices=["step", "bank", "both"],
                      help="references through the backbone in the step, the precomputed "
                      "bank (train.precomputed_refs), or both")
  parser.add_argument("--attention", default="dense",
                      help="projector.attention compiled (dense: TPU's auto and a GPU's where "
                      "cuDNN refuses; cuDNN's fused form cannot be compiled on a CPU)")
  parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed")
  parser.add_argument("--anomalous-share", type=float, default=0.03,
                      help="share of tokens of the rarer label (the angle loss's rows)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main() -> None:
  args = parse_args()
  if args.child:
    return child(args)
  # One process per compiled device count, XLA_FLAGS set before jax starts.
  for devices in [int(n) for n in args.devices.split(",")]:
    compiled_at = args.compile_devices or devices
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={compiled_at}".strip())
    argv = [a for a in sys.argv[1:]]
    argv += ["--child", "--devices", str(devices)]
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                            stdout=subprocess.PIPE, text=True)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    if result.returncode:
      sys.exit(result.returncode)


def child(args: argparse.Namespace) -> None:
  import jax
  target = int(args.devices)
  compiled_at = jax.device_count()
  for name in args.backbone.split(","):
    for refs in (("step", "bank") if args.refs == "both" else (args.refs,)):
      print(json.dumps(configuration(args, name.strip(), refs, target, compiled_at)),
            flush=True)


def _abstract_step(args, backbone, refs: str, mesh):
  """The train step of adjax/train.py and abstract, sharded arguments for it."""
  import functools

  import jax
  import jax.numpy as jnp

  from adjax import sharding
  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import StepSettings, init_train_state, make_train_step

  dtype = jnp.dtype(args.dtype)
  settings = StepSettings(level_strides=tuple(backbone.level_strides), num_heads=args.num_heads,
                          compute_dtype=dtype, attention=args.attention, mesh=mesh)
  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=1000)
  params = jax.eval_shape(lambda: init_projector(jax.random.key(0), backbone.level_dims,
                                                 num_heads=args.num_heads,
                                                 num_ref_tokens=args.num_ref))
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.key(1)), params)
  frozen = {"backbone": backbone.param_shapes(),
            "centers": [jax.ShapeDtypeStruct((c,), jnp.float32) for c in backbone.level_dims]}
  size, b, shots = args.image_size or backbone.input_size, args.batch * mesh.size, args.max_shots
  tokens = (size // backbone.level_strides[0]) ** 2
  batch = {"view1": ((b, size, size, 3), jnp.uint8), "view2": ((b, size, size, 3), jnp.uint8),
           "masks": ((b, size, size), jnp.uint8), "ref_valid": ((b, shots), bool)}
  if refs == "step":
    batch["refs"] = ((b, shots, size, size, 3), jnp.uint8)
  else:   # adjax/train.py: frozen["ref_bank"] per level (G, S_max + 1, h * w, C), float32
    batch["ref_group"] = ((b,), jnp.int32)
    batch["ref_self"] = ((b, shots + 1), bool)
    frozen["ref_bank"] = [jax.ShapeDtypeStruct((GROUPS, shots + 1, tokens, c), jnp.float32)
                          for c in backbone.level_dims]
  replicated = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.replicated(mesh)), t)
  batch = {k: jax.ShapeDtypeStruct(*v, sharding=sharding.batch_sharded(mesh))
           for k, v in batch.items()}
  # The backbone in the compute dtype. (adjax/train.py passes backbone.extract, whose default
  # dtype is float32, so a run's step computes the backbone in float32 today.)
  extract = functools.partial(backbone.extract, dtype=dtype)
  step = sharding.jit_data_parallel(make_train_step(settings, optimizer, extract), mesh)
  return step, (replicated(state), batch, replicated(frozen)), tokens


def collective_bytes(hlo: str, devices: int) -> dict[str, dict[str, float]]:
  """Per collective kind: count, payload bytes (the gathered / reduced size) and the bytes a
  device sends with ring algorithms, from compiled HLO text."""
  out = {}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(",
                     line)
    if not match:
      continue
    kind = match.group(2)
    size = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      size += _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    if kind == "reduce-scatter":
      size *= devices   # the result is one device's share of the reduced operand
    factor = {"all-reduce": 2 * (devices - 1) / devices}.get(kind, (devices - 1) / devices)
    entry = out.setdefault(kind, {"count": 0, "payload_bytes": 0.0, "sent_bytes": 0.0})
    entry["count"] += 1
    entry["payload_bytes"] += size
    entry["sent_bytes"] += size * (factor if kind != "collective-permute" else 1.0)
  return out


def vit_forward_flops(module, size: int) -> float:
  """Matmul FLOPs of the ViT's forward pass on one image, up to its last tapped block."""
  patches = (size // module.patch) ** 2
  n, d = patches + 1, module.width
  per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * module.mlp_dim
  return 2 * patches * 3 * module.patch ** 2 * d + max(module.taps) * per_block


def analytic_flops(args, backbone, refs: str, tokens: int, devices: int) -> dict[str, float]:
  """Per device and step: backbone, residual matching, projector (x3 for the backward) and the
  angle loss's rarer-label rows against all 2N rows of the global batch (x4: similarities,
  their recomputation and two gradient products)."""
  b, shots, r = args.batch, args.max_shots, args.num_ref
  images = b * (2 + (shots if refs == "step" else 0))
  size = getattr(args, "image_size", 0) or backbone.input_size
  backbone_flops = images * vit_forward_flops(backbone.module, size)
  residual = projector = angle = 0.0
  for c in backbone.level_dims:
    residual += 2 * 2 * (b * tokens) * (shots * tokens) * c   # both views vs their references
    t = 2 * b * tokens
    projector += 3 * (3 * 2 * r * c * c + 2 * 2 * t * c * c + 2 * 2 * t * r * c
                      + 2 * 2 * t * c * 4 * c)
    rows = args.anomalous_share * 2 * b * tokens
    angle += 4 * 2 * rows * (2 * b * tokens * devices) * c
  return {"backbone": backbone_flops, "residual": residual, "projector": projector,
          "angle_loss": angle, "total": backbone_flops + residual + projector + angle}


def configuration(args, name: str, refs: str, target: int, compiled_at: int) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh

  from adjax import sharding
  from adjax.models.backbones import get_backbone
  from adjax.models.reference_attention import attention_record

  backbone = get_backbone(name)
  mesh = Mesh(np.asarray(jax.devices()), (sharding.DATA_AXIS,))
  step, step_args, tokens = _abstract_step(args, backbone, refs, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(*step_args).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  collectives = collective_bytes(compiled.as_text(), compiled_at)
  flops = analytic_flops(args, backbone, refs, tokens, target)
  mem = {"argument_bytes": memory.argument_size_in_bytes,
         "output_bytes": memory.output_size_in_bytes,
         "alias_bytes": memory.alias_size_in_bytes,
         "temp_bytes": memory.temp_size_in_bytes}
  scale = target / compiled_at
  if scale != 1:
    # The angle loss's gathered columns and their gradient buffer grow with the global batch.
    gathered = sum(2 * 2 * args.batch * tokens * c * 4 for c in backbone.level_dims)
    mem["temp_bytes"] = int(mem["temp_bytes"] + 2 * gathered * (target - compiled_at))
    for kind in ("all-gather", "reduce-scatter"):
      if kind in collectives:
        for key in ("payload_bytes", "sent_bytes"):
          collectives[kind][key] *= scale
    ring = lambda n: (n - 1) / n
    for kind, entry in collectives.items():   # the ring factor at the target count
      factor = 2 * ring(target) / (2 * ring(compiled_at)) if kind == "all-reduce" else (
          ring(target) / ring(compiled_at))
      entry["sent_bytes"] *= factor
  peak_bytes = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem[
      "temp_bytes"]
  sent = sum(e["sent_bytes"] for e in collectives.values())
  images_per_step = args.batch * target
  steps_10_epochs = EPOCHS * math.ceil(REALIAD_IMAGES / images_per_step)
  projections = {}
  for device, spec in DEVICES.items():
    link = spec["link"] if target <= spec["node"] else spec["link_beyond"]
    compute_s = flops["total"] / (spec["peak"] * args.mfu)
    comm_s = sent / link
    step_s = compute_s + comm_s
    # Images the hosts decode per second: each image once for its two views, plus its
    # references when they go through the step.
    decodes = args.batch * (1 + (args.max_shots if refs == "step" else 0)) / step_s
    projections[device] = {
        "compute_s": round(compute_s, 4), "communication_s": round(comm_s, 4),
        "step_s": round(step_s, 4), "images_per_s": round(images_per_step / step_s, 1),
        "ten_epochs_hours": round(steps_10_epochs * step_s / 3600, 2),
        "decoded_images_per_s_per_host": round(decodes * min(spec["node"], target)),
        "fits_hbm": peak_bytes <= spec["hbm"]}
  attention = attention_record(args.attention, level_dims=backbone.level_dims,
                               num_heads=args.num_heads, dtype=args.dtype)
  heads_tokens = args.num_heads * 2 * args.batch * tokens * args.num_ref
  return {
      "bench": "scale_model", "backbone": name, "refs": refs, "devices": target,
      "compiled_devices": compiled_at,
      "extrapolated_from_devices": compiled_at if scale != 1 else None,
      "batch_per_device": args.batch, "max_shots": args.max_shots, "tokens_per_image": tokens,
      "dtype": args.dtype, "attention": attention["implementation"],
      "compile_s": round(compile_s, 1),
      "memory_per_device": {**mem, "peak_estimate_bytes": peak_bytes},
      "dense_attention_logits_bytes_per_level": heads_tokens * 4,
      "xla_flops_per_device": float(cost.get("flops", float("nan"))) if cost else None,
      "analytic_flops_per_device": flops,
      "collectives_per_device": collectives, "collective_sent_bytes_per_device": sent,
      "mfu": args.mfu, "projection": projections,
      "projection_note": "PROJECTED, not measured: analytic FLOPs at the assumed MFU plus "
                         "collective bytes over the assumed link, not overlapped"}


if __name__ == "__main__":
  main()
