"""Angle loss with rows split over an 8-device mesh vs the whole batch on one device.

Run by test_train_devices.py in a subprocess (XLA_FLAGS must be set before jax starts):
  python multidevice_angle.py OUT.npz
Saves, for several label/centre/weight cases, the loss and gradients of both computations.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from adjax.losses.angle import angle_loss
  from adjax.sharding import DATA_AXIS
  from adjax.pretrain.step import StepSettings, angle_term

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
  rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  rng = np.random.default_rng(0)
  n, dim = 8 * 24, 16
  e1 = rng.normal(size=(n, dim)).astype(np.float32)
  e2 = (e1 + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
  center = (0.1 * rng.normal(size=(dim,))).astype(np.float32)
  cases = {
      "center": ((rng.random(n) < 0.15).astype(np.float32), center),
      "nocenter": ((rng.random(n) < 0.4).astype(np.float32), None),
      # every anomalous token on one device's rows only
      "one_device_anomalous": (np.r_[np.ones(5), np.zeros(n - 5)].astype(np.float32), center),
      "all_normal": (np.zeros(n, np.float32), center),
  }
  out = {}
  # Blocks of 7: several blocks per device; 2048: one. tau 0.15 takes the rarer-label rows path,
  # 0.02 the running-maximum one. Labels and centre are arguments, so that one program per
  # setting serves every label case (constants compiled one program per case).
  for block, temps in ((7, (0.15, 0.02)), (2048, (0.15,))):
    for temp in temps:
      base = StepSettings(level_strides=(14,), angle_block_size=block, temperature=temp)
      fns = {kind: jax.jit(jax.value_and_grad(
                 lambda a, b, m, cc, s=settings: angle_term(a, b, m, cc, s), (0, 1)))
             for kind, settings in (("one", base),
                                    ("sharded", dataclasses.replace(base, mesh=mesh)))}
      plain = jax.jit(lambda a, b, m, cc, t=temp, k=block: angle_loss(a, b, m, cc, t,
                                                                     block_size=k))
      for case, (labels, c) in cases.items():
        name = f"{block}/{case}_tau{temp}"
        for kind, fn in fns.items():
          args = (e1, e2, labels)
          if kind == "sharded":
            args = tuple(jax.device_put(a, rows) for a in args)
          loss, (g1, g2) = fn(*args, c)
          out[f"{name}/{kind}/loss"] = np.asarray(loss)
          out[f"{name}/{kind}/g1"] = np.asarray(g1)
          out[f"{name}/{kind}/g2"] = np.asarray(g2)
        # The plain loss on one device, as the third opinion.
        out[f"{name}/plain/loss"] = np.asarray(plain(e1, e2, labels, c))
  text = jax.jit(lambda a, b: angle_term(a, b, cases["center"][0], center,
                                          dataclasses.replace(base, mesh=mesh))).lower(
      jax.device_put(e1, rows), jax.device_put(e2, rows)).compile().as_text()
  out["has_all_gather"] = np.asarray("all-gather" in text)
  np.savez(sys.argv[1], **out)


if __name__ == "__main__":
  main()
