"""Runs two pretraining steps on a fixed global batch and saves the final projector params.

Used by test_train.py in subprocesses (XLA_FLAGS and jax.distributed must be set up before
jax starts):
  python multidevice_step.py OUT [--devices 1,8]   one process; OUT_1.npz, OUT_8.npz: meshes of
                                                    1 and of 8 devices
  JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i python multidevice_step.py
  OUT.npz
Every process builds the same global batch from a seed and contributes its own rows.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--devices", default="0", help="comma-separated mesh sizes; 0 = all")
  args = parser.parse_args()

  import jax
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  import numpy as np
  from jax.sharding import Mesh

  from adjax import sharding

  sharding.maybe_initialize_distributed()
  for count in [int(n) for n in args.devices.split(",")]:
    devices = jax.devices()[:count] if count else jax.devices()
    losses, flat = run_two_steps(Mesh(np.asarray(devices), (sharding.DATA_AXIS,)))
    if jax.process_index() == 0:
      np.savez(f"{args.out}_{count}.npz", losses=np.asarray(losses), devices=len(devices),
               **flat)


def run_two_steps(mesh):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from adjax import sharding
  from adjax.models.backbones import get_backbone
  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import StepSettings, init_train_state, make_train_step

  backbone = get_backbone("tiny-vit", depth=2, taps=(1, 2))
  backbone_params = backbone.init(jax.random.PRNGKey(0))
  settings = StepSettings(level_strides=tuple(backbone.level_strides), num_heads=4,
                          compute_dtype=jnp.float32, angle_block_size=64,
                          mesh=mesh)  # more than one device: the angle loss is row-sharded
  optimizer = make_optimizer(1e-4, 5e-4, steps_per_epoch=10)  # the recipe's lr
  params = init_projector(jax.random.PRNGKey(1), backbone.level_dims, num_heads=4,
                          num_ref_tokens=32)
  state = sharding.replicate(init_train_state(params, optimizer, jax.random.PRNGKey(2)), mesh)
  frozen = sharding.replicate({"backbone": backbone_params,
                               "centers": [jnp.full((c,), 0.01) for c in backbone.level_dims]},
                              mesh)
  step = sharding.jit_data_parallel(
      make_train_step(settings, optimizer, backbone.extract), mesh)

  rng = np.random.default_rng(0)
  batch_size, size, shots = 8, 28, 2
  losses = []
  for _ in range(2):
    full = {
        "view1": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "view2": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "masks": np.zeros((batch_size, size, size), np.uint8),
        "refs": rng.integers(0, 256, (batch_size, shots, size, size, 3), dtype=np.uint8),
        "ref_valid": np.ones((batch_size, shots), bool),
    }
    full["masks"][:3, :14, :14] = 1
    full["ref_valid"][::2, 1] = False
    # This process's rows of the global batch.
    per = batch_size // jax.process_count()
    lo = jax.process_index() * per
    local = {k: v[lo:lo + per] for k, v in full.items()}
    state, metrics = step(state, sharding.global_batch(local, mesh), frozen)
    losses.append(float(metrics["loss"]))
  flat = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  return losses, flat




if __name__ == "__main__":
  main()
