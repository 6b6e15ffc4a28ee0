"""Device-count independence of the train step: 8 CPU devices, and two processes through
jax.distributed (CPU collectives over gloo), give the parameters of one device."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from adjax.models.projector import init_projector

HERE = pathlib.Path(__file__).parent
SUPPORT = HERE.parent / "support"


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


# --------------------------------------------------------------------- device count
@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh") / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(SUPPORT / "multidevice_step.py"), str(out),
                  "--devices", "1,8"], check=True, env=env, timeout=600)
  return np.load(f"{out}_1.npz"), np.load(f"{out}_8.npz")


def test_sharded_step_matches_single_device(eight_device_results):
  one, eight = eight_device_results
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  for key in one.files:
    if key.startswith("["):
      np.testing.assert_allclose(eight[key], one[key], atol=1e-5, rtol=0, err_msg=key)
  # The two steps really trained: parameters moved.
  params0 = _flat(init_projector(jax.random.PRNGKey(1), [64, 64], num_heads=4,
                                 num_ref_tokens=32))
  assert max(np.abs(one[k] - params0[k]).max() for k in params0) > 1e-5


def test_angle_loss_rows_split_over_devices(tmp_path):
  # Each device computes its rows against every device's rows: the loss and its gradients are
  # those of the whole batch on one device.
  out = tmp_path / "angle.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(SUPPORT / "multidevice_angle.py"), str(out)], check=True,
                 env=env, timeout=600)
  data = np.load(out)
  assert bool(data["has_all_gather"])
  names = {key.rsplit("/", 2)[0] for key in data.files if key.count("/") == 3}
  assert len(names) == 12   # 4 label cases x (block 7 at tau 0.15 and 0.02, 2048 at 0.15)
  for name in sorted(names):
    one, sharded = f"{name}/one", f"{name}/sharded"
    np.testing.assert_allclose(data[f"{sharded}/loss"], data[f"{one}/loss"], rtol=1e-5,
                               err_msg=name)
    np.testing.assert_allclose(data[f"{one}/loss"], data[f"{name}/plain/loss"], rtol=1e-5)
    for grad in ("g1", "g2"):
      scale = max(np.abs(data[f"{one}/{grad}"]).max(), 1e-12)
      np.testing.assert_allclose(data[f"{sharded}/{grad}"], data[f"{one}/{grad}"],
                                 atol=1e-5 * scale, rtol=0, err_msg=f"{name} {grad}")
    if "all_normal" in name:
      assert float(data[f"{sharded}/loss"]) == 0.0
    else:
      assert float(data[f"{sharded}/loss"]) != 0.0


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(argv: list[str], timeout: int) -> list[str]:
  """Runs argv as the two processes of a jax.distributed job on localhost (CPU); returns
  their outputs after checking that both succeeded."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    env.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out.decode()[-3000:]
    outputs.append(out.decode())
  return outputs


def test_two_processes_match_one(eight_device_results, tmp_path):
  one, _ = eight_device_results
  _run_two_processes([str(SUPPORT / "multidevice_step.py"), str(tmp_path / "dist"),
                      "--devices", "0"], timeout=600)
  two = np.load(tmp_path / "dist_0.npz")
  assert int(two["devices"]) == 2
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  for key in one.files:
    if key.startswith("["):
      np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=0, err_msg=key)


def test_preemption_of_one_host_stops_every_host_at_the_same_step():
  # A host that stopped alone would leave the others waiting in the next step's collectives.
  outputs = _run_two_processes([str(SUPPORT / "multiprocess_preemption.py")], timeout=300)
  stops = [[line for line in out.splitlines() if line.startswith(("STOP", "NEVER"))]
           for out in outputs]
  assert stops[0] == stops[1] and len(stops[0]) == 1 and stops[0][0].startswith("STOP"), stops
  assert int(stops[0][0].split()[1]) >= 3


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_NTASKS": "8"}, None),                  # an salloc shell: this process runs alone
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}, {}),   # an srun step of 8 tasks
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"ADJAX_DISTRIBUTED": "1"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
])
def test_distributed_initialisation_follows_the_launcher(env, expected, monkeypatch):
  from adjax import sharding
  for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "ADJAX_DISTRIBUTED",
               "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(sharding.maybe_initialize_distributed, "_done", False, raising=False)
  sharding.maybe_initialize_distributed()
  assert calls == ([] if expected is None else [expected])
