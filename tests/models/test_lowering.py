"""The pretraining step lowers for GPUs and TPUs from this CPU-only machine (jax.export), in
bfloat16, on one device and on a mesh of 8, with no CPU-only code in it.

Checked in the exported StableHLO: no custom call of adjax's native CPU kernel (its FFI target
names), no optimisation barrier (the matmul's CPU-only transpose copy), every product of the
projector's linear layers and of its attention in bfloat16 with float32 accumulation; and over
8 devices, only the collectives of the design:

* all-reduce: the replicated projector's gradients (data parallel) and the metrics;
* all-gather, reduce-scatter and all-reduce inside the angle loss's row split
  (adjax/losses/angle.py under jax.shard_map, see adjax/pretrain/step.py angle_term): each device
  gathers every device's rows (and labels, and in the backward the log-sum-exps and their
  gradients), the column gradients are reduce-scattered back to their rows, the loss psum-ed.

The partitioner's own collectives (the gradient all-reduce) appear only once the program is
compiled; for that the 8-device step is also compiled for this machine's 8 virtual CPU devices
and its HLO read. Not checked here: cuDNN's fused attention, which jax cannot lower without a
GPU (its trace asks the cuDNN library for its version; see test_cudnn_attention_needs_a_gpu),
so "dot_product" is lowered in its XLA form; and "auto", which resolves by the backend this
process runs on (here: "blocked"), so the GPU's and TPU's choices are asked for by name.

The 8-device part runs in a subprocess (this file run as a script), with XLA_FLAGS set before
jax is imported.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:   # run as a script
  sys.path.insert(0, ROOT)

# Tiny: channels 32 (2 heads of 16), 24 reference tokens, batch 2 of 3 x 3 tokens.
DIM, HEADS, REFS, BATCH, SIDE = 32, 2, 24, 2, 3


def _adjax_ffi_targets() -> list[str]:
  from adjax.kernels import native   # the names only: importing builds nothing
  return list(native.TARGETS.values())


def _dots(text: str) -> list[dict]:
  """Every stablehlo.dot_general: operand and result types, the op's name (its location: the
  module path, e.g. ".../ProjectorBlock/layers_0/cross_attn/query/dot_general") and whether it
  computes in bfloat16 (operands bfloat16, or a bf16 x bf16 -> f32 dot algorithm)."""
  names = dict(re.findall(r'^(#loc\d+) = loc\("([^"]*)"', text, re.M))
  dots = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    lhs, rhs, out = re.search(r": \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>",
                              line).groups()
    loc = re.search(r"loc\((#loc\d+)\)\s*$", line)
    by_algorithm = "lhs_precision_type = bf16, rhs_precision_type = bf16" in line
    dots.append({"lhs": lhs, "rhs": rhs, "out": out,
                 "name": names.get(loc.group(1), "") if loc else "",
                 "bf16": by_algorithm or (lhs.endswith("bf16") and rhs.endswith("bf16"))})
  return dots


def check_gpu_tpu_program(text: str) -> None:
  """The assertions every exported GPU/TPU step must pass (see the module docstring)."""
  targets = set(re.findall(r'custom_call @([\w$.]+)', text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', text))
  assert not targets & set(_adjax_ffi_targets()), targets
  assert "optimization_barrier" not in text   # the matmul's CPU-only transpose copy
  dots = _dots(text)
  # The projector's products, forward and backward: its linear layers (reference projection,
  # query, key, value, out, fc1, fc2) and its attention. Only the squeeze-excite gate's tiny
  # products on per-image means (B, 4C) stay in float32 by design (projector._gated_gelu's
  # nested jvp), and so does everything outside the projector in the losses.
  projector = [d for d in dots if "ProjectorBlock" in d["name"]
               and not re.search(r"/mlp/(transpose\()?jvp\(\)", d["name"])]
  assert len(projector) >= 20, len(projector)   # 11 forward, 20+ backward
  for d in projector:
    assert d["bf16"], d
  kinds = {d["name"].rsplit("/", 2)[-2] for d in projector}
  assert {"ref_proj", "query", "key", "value", "out", "fc2"} <= kinds, kinds
  # Forward products and weight gradients accumulate in float32 (rounded once afterwards).
  linear = [d for d in projector
            if re.search(r"/(query|key|value|out|fc2|ref_proj)/", d["name"])]
  assert all(d["out"].endswith("f32") for d in linear), linear


def _projector_step_args():
  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import init_train_state

  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=10)
  params = jax.eval_shape(lambda: init_projector(jax.random.key(0), (DIM,), num_heads=HEADS,
                                                 num_ref_tokens=REFS))
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.key(1)), params)
  return optimizer, state


@pytest.mark.parametrize("attention", ["dense", "dot_product"])
def test_projector_step_lowers_for_gpu_and_tpu_in_bfloat16(attention):
  # Projector on both views, angle and norm losses, backward, Adam update: "dense" is what a
  # TPU's auto runs (and a GPU's where cuDNN refuses); "dot_product" here is jax's XLA form.
  from adjax.pretrain.step import StepSettings, residual_update

  optimizer, state = _projector_step_args()
  settings = StepSettings(level_strides=(14,), num_heads=HEADS, compute_dtype=jnp.bfloat16,
                          attention=attention, angle_block_size=64)
  residuals = [jax.ShapeDtypeStruct((BATCH, SIDE, SIDE, DIM), jnp.float32)]
  masks = jax.ShapeDtypeStruct((BATCH, SIDE * 14, SIDE * 14), jnp.float32)
  centers = [jax.ShapeDtypeStruct((DIM,), jnp.float32)]
  step = jax.jit(lambda s, a, b, m, c: residual_update(s, a, b, m, c, settings, optimizer))
  for platform in ("cuda", "tpu"):
    exported = export.export(step, platforms=(platform,))(state, residuals, residuals, masks,
                                                          centers)
    check_gpu_tpu_program(exported.mlir_module())
  # The same step for this CPU keeps the CPU-only transpose copy (lax.platform_dependent picks
  # it for the CPU only): the check above can tell the two apart.
  cpu = export.export(step, platforms=("cpu",))(state, residuals, residuals, masks, centers)
  assert "optimization_barrier" in cpu.mlir_module()


def _backbone_step(attention, mesh=None):
  """The whole step with the tiny ViT inside (backbone on both views and the references,
  residuals, projector, losses, update), abstract arguments; the backbone in bfloat16."""
  from adjax.models.backbones import get_backbone
  from adjax.optim import make_optimizer
  from adjax.models.projector import init_projector
  from adjax.pretrain.step import StepSettings, init_train_state, make_train_step

  # A fresh backbone per program: jax 0.10.2's export miscounts the arguments of a program whose
  # inner jitted function (the backbone's cached extract) was lowered before inside another
  # sharded program ("Too many leaves for PyTreeDef").
  backbone = get_backbone("tiny-vit", depth=1, taps=(1,))
  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=10)
  settings = StepSettings(level_strides=tuple(backbone.level_strides), num_heads=4,
                          compute_dtype=jnp.bfloat16, attention=attention, angle_block_size=64,
                          mesh=mesh)
  params = jax.eval_shape(lambda: init_projector(jax.random.key(0), backbone.level_dims,
                                                 num_heads=4, num_ref_tokens=REFS))
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer, jax.random.key(1)), params)
  frozen = {"backbone": backbone.param_shapes(),
            "centers": [jax.ShapeDtypeStruct((c,), jnp.float32) for c in backbone.level_dims]}
  b, size, shots = 8, 28, 2
  batch = {"view1": ((b, size, size, 3), jnp.uint8), "view2": ((b, size, size, 3), jnp.uint8),
           "masks": ((b, size, size), jnp.uint8), "refs": ((b, shots, size, size, 3), jnp.uint8),
           "ref_valid": ((b, shots), bool)}
  if mesh is None:
    batch = {k: jax.ShapeDtypeStruct(*v) for k, v in batch.items()}
  else:
    from adjax import sharding
    replicated = lambda t: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), t)
    state, frozen = replicated(state), replicated(frozen)
    batch = {k: jax.ShapeDtypeStruct(*v, sharding=sharding.batch_sharded(mesh))
             for k, v in batch.items()}
  step = make_train_step(settings, optimizer, functools.partial(backbone.extract,
                                                                 dtype=jnp.bfloat16))
  return step, (state, batch, frozen)


@pytest.mark.parametrize("attention", ["dense", "dot_product"])
def test_step_with_the_tiny_vit_lowers_for_gpu_and_tpu(attention):
  step, args = _backbone_step(attention)
  for platform in ("cuda", "tpu"):
    text = export.export(jax.jit(step), platforms=(platform,))(*args).mlir_module()
    check_gpu_tpu_program(text)
    # The frozen ViT's dense layers: plain bfloat16 products on GPUs and TPUs, bfloat16 out
    # (the CPU-only float32-accumulating form of accumulating_dot_general is not there).
    dense = [d for d in _dots(text) if re.search(r"ViT/blocks_0/(qkv|proj|fc1|fc2)/", d["name"])]
    assert len(dense) == 8   # 4 layers, on the views and on the references
    assert all(d["bf16"] and d["out"].endswith("bf16") for d in dense), dense


def test_cudnn_attention_needs_a_gpu():
  # jax traces cuDNN's fused attention only where the cuDNN library answers: on a machine
  # without a GPU it cannot be lowered for one, which is why the tests above lower the XLA form.
  from adjax.models.reference_attention import dot_product_attention
  q = jax.ShapeDtypeStruct((HEADS, 64, 16), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((HEADS, REFS, 16), jnp.bfloat16)
  fn = jax.jit(lambda a, b, c: dot_product_attention(a, b, c, cudnn=True))
  if jax.default_backend() != "gpu":
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
      export.export(fn, platforms=("cuda",))(q, k, k)
  else:   # with a GPU: the fused attention's custom call
    assert "__cudnn$fmha" in export.export(fn, platforms=("cuda",))(q, k, k).mlir_module()


# --------------------------------------------------------------------- 8 devices
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all", "collective-broadcast")


def compiled_collectives(hlo: str) -> list[dict]:
  """Collective instructions of compiled HLO text: kind, result shapes, source op name."""
  found = []
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(_COLLECTIVES)
                     + r")(?:-start)?\(", line)
    if not match:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    found.append({"kind": match.group(2), "shapes": re.findall(r"\w+\[[\d,]*\]", match.group(1)),
                  "op_name": name.group(1) if name else ""})
  return found


def _mesh_report(out_path: str) -> None:
  """Subprocess body: export and compile the 8-device step, write what the test checks."""
  from adjax import sharding
  mesh = sharding.data_mesh()
  assert mesh.size == 8, mesh
  report = {"exports": {}}
  for attention in ("dense", "dot_product"):
    for platform in ("cuda", "tpu"):
      step, args = _backbone_step(attention, mesh)
      exported = export.export(jax.jit(step), platforms=(platform,))(*args)
      text = exported.mlir_module()
      check_gpu_tpu_program(text)
      report["exports"][f"{attention}/{platform}"] = {
          "devices": exported.nr_devices,
          "collectives": sorted(set(re.findall(
              r"stablehlo\.(all_reduce|all_gather|reduce_scatter|collective_permute|all_to_all"
              r"|collective_broadcast)", text)))}
  # The step as adjax/train.py compiles it (batch split, state and weights replicated), for
  # this machine's 8 virtual CPU devices: the partitioner's collectives too.
  step, args = _backbone_step("dense", mesh)
  compiled = sharding.jit_data_parallel(step, mesh).lower(*args).compile()
  report["compiled"] = compiled_collectives(compiled.as_text())
  with open(out_path, "w") as f:
    json.dump(report, f)


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("lowering") / "mesh.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get(
                 "PYTHONPATH", "")]))
  subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], check=True, env=env,
                 timeout=600)
  with open(out) as f:
    return json.load(f)


def test_sharded_step_lowers_with_only_the_angle_loss_collectives(mesh_report):
  # The subprocess ran check_gpu_tpu_program on each export (no kernel, no barrier, bfloat16).
  for name, export_report in mesh_report["exports"].items():
    assert export_report["devices"] == 8, name
    # Explicit in the program: the angle loss's row split, nothing else.
    assert export_report["collectives"] == ["all_gather", "all_reduce", "reduce_scatter"], name


def test_compiled_sharded_step_moves_only_gradients_metrics_and_angle_rows(mesh_report):
  collectives = mesh_report["compiled"]
  kinds = {c["kind"] for c in collectives}
  # No resharding of activations (collective-permute, all-to-all): each device keeps its own
  # images from the backbone to the losses.
  assert kinds == {"all-reduce", "all-gather", "reduce-scatter"}, kinds
  # Gathers and scatters come only from the angle loss's shard_map.
  for c in collectives:
    if c["kind"] in ("all-gather", "reduce-scatter"):
      assert "shard_map" in c["op_name"], c
  # The gradient all-reduce covers the projector's MLP kernels (64 channels, 256 wide).
  reduced = {s for c in collectives if c["kind"] == "all-reduce" for s in c["shapes"]}
  assert {"f32[64,256]", "f32[256,64]"} <= reduced, sorted(reduced)


if __name__ == "__main__":
  _mesh_report(sys.argv[1])
