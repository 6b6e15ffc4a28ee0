"""Projector weights to and from PyTorch: `adjax export` / `adjax import` (adjax/interop.py).

Exported files are loaded into the independent PyTorch projector of tests/support/torch_reference.py
with strict=True and must give adjax's outputs; imported reference checkpoints must give the
PyTorch module's outputs; import then export must give back the same arrays.
"""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy

from adjax.io import files
from adjax import run_layout
from adjax.cli import main
from adjax.models.projector_torch import projector_from_torch, projector_to_torch
from adjax.checkpointing import read_run_params
from adjax.io.pth_writer import pth_bytes
from adjax.models.projector import project
from run_helpers import one_error_line
from torch_reference import Projector

pytestmark = pytest.mark.torch

# tiny-vit: a registered backbone with four levels of 64 channels.
BACKBONE, DIMS, HEADS, NUM_REF = "tiny-vit", (64, 64, 64, 64), 4, 16


def _levels(seed: int, batch: int = 2, h: int = 3, w: int = 2) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(batch, h, w, c)).astype(np.float32) for c in DIMS]


def _torch_outputs(module: Projector, levels: list[np.ndarray]) -> list[np.ndarray]:
  with torch.no_grad():
    outs = module([torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in levels])
  return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


def _adjax_outputs(params, levels) -> list[np.ndarray]:
  return [np.asarray(o) for o in project(params, [jax.numpy.asarray(x) for x in levels],
                                         num_heads=HEADS)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A run dir as the trainer leaves it: config.json and best/{angle,norm}."""
  workdir = str(tmp_path_factory.mktemp("run"))
  # Params from a seeded PyTorch module (init_projector's first call compiles for seconds);
  # the tests load exported files into a *fresh* module, so the two never share weights.
  torch.manual_seed(1)
  angle = projector_from_torch(Projector(DIMS, heads=HEADS, num_ref=NUM_REF).state_dict())
  norm = jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5 + 0.01, angle)
  from adjax.configs import default_config
  config = default_config()
  config.backbone.name = BACKBONE
  config.projector.num_heads = HEADS
  config.projector.num_ref_tokens = NUM_REF
  run_layout.save_config(workdir, config)
  run_layout.save_best(workdir, "angle", angle, {"step": 120, "metrics": {"image_auroc": 0.91}})
  run_layout.save_best(workdir, "norm", norm, {"step": 80, "metrics": {"image_auroc": 0.88}})
  return workdir, angle, norm


@pytest.mark.parametrize("out_name,no_torch", [
    ("p_angle.pth", False), ("p_angle_builtin.pth", True), ("p_angle.safetensors", False)])
def test_export_loads_strict_into_torch_reference(trained_run, tmp_path, out_name, no_torch):
  workdir, angle, _ = trained_run
  out = str(tmp_path / out_name)
  argv = ["export", "--workdir", workdir, "--out", out] + (["--no-torch"] if no_torch else [])
  assert main(argv) == 0
  if out.endswith(".pth"):
    state_dict = torch.load(out, map_location="cpu", weights_only=True)["projectors"]
  else:
    state_dict = {k: torch.from_numpy(v.copy()) for k, v in st_load_numpy(out).items()}
  module = Projector(DIMS, heads=HEADS, num_ref=NUM_REF, depth=1)
  module.load_state_dict(state_dict, strict=True)
  levels = _levels(0)
  for ours, theirs in zip(_adjax_outputs(angle, levels), _torch_outputs(module, levels)):
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  if out.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(out, "np") as f:
      meta = f.metadata()
    assert meta["backbone"] == BACKBONE and meta["which"] == "angle"
    assert json.loads(meta["dims"]) == list(DIMS) and json.loads(meta["levels"]) == 4
    assert json.loads(meta["step"]) == 120
    assert json.loads(meta["metrics"]) == {"image_auroc": 0.91}


def test_export_norm_picks_the_norm_params(trained_run, tmp_path):
  workdir, _, norm = trained_run
  out = str(tmp_path / "n.safetensors")
  assert main(["export", "--workdir", workdir, "--out", out, "--which", "norm"]) == 0
  got = st_load_numpy(out)
  want = projector_to_torch(norm)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_import_reference_checkpoint_then_export_round_trip(tmp_path, capsys):
  # A checkpoint as the reference saves it: torch.save({"projectors": module.state_dict()}).
  torch.manual_seed(0)
  module = Projector(DIMS, heads=HEADS, num_ref=NUM_REF, depth=2)
  ckpt = str(tmp_path / "checkpoints_pro_norm.pth")
  torch.save({"projectors": module.state_dict()}, ckpt)
  run = str(tmp_path / "imported")
  assert main(["import", ckpt, "--backbone", BACKBONE, "--out", run,
               f"--config.projector.num_heads={HEADS}"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["kinds"] == ["norm"] and summary["depth"] == 2
  assert os.path.isfile(run_layout.best_params_path(run, "norm"))
  assert not os.path.exists(run_layout.best_params_path(run, "angle"))
  config = run_layout.load_config(run)
  assert config.backbone.name == BACKBONE
  assert (config.projector.num_ref_tokens, config.projector.depth) == (NUM_REF, 2)

  # The imported params compute what the PyTorch module computes.
  params, _ = read_run_params(run, "norm")
  levels = _levels(1)
  for ours, theirs in zip(_adjax_outputs(params, levels), _torch_outputs(module, levels)):
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

  # Export gives back exactly the arrays that were imported, in both formats.
  want = {k: v.numpy() for k, v in module.state_dict().items()}
  back_st = str(tmp_path / "back.safetensors")
  back_pth = str(tmp_path / "back.pth")
  assert main(["export", "--workdir", run, "--out", back_st, "--which", "norm"]) == 0
  assert main(["export", "--workdir", run, "--out", back_pth, "--which", "norm",
               "--no-torch"]) == 0
  got_st = st_load_numpy(back_st)
  got_pth = torch.load(back_pth, weights_only=True)["projectors"]
  assert sorted(got_st) == sorted(want) == sorted(got_pth)
  for key, value in want.items():
    np.testing.assert_array_equal(got_st[key], value)
    np.testing.assert_array_equal(got_pth[key].numpy(), value)


def test_import_from_exported_safetensors_reads_backbone_and_kind(trained_run, tmp_path):
  workdir, angle, _ = trained_run
  exported = str(tmp_path / "weights.safetensors")
  assert main(["export", "--workdir", workdir, "--out", exported]) == 0
  run = str(tmp_path / "again")
  # No --backbone, no --which, no head count: all come from the metadata export wrote.
  assert main(["import", exported, "--out", run]) == 0
  assert run_layout.load_config(run).projector.num_heads == HEADS
  params, meta = read_run_params(run, "angle")
  assert meta["step"] == 120
  flat_in = run_layout.flatten_params(angle)
  flat_out = run_layout.flatten_params(params)
  assert sorted(flat_in) == sorted(flat_out)
  for key in flat_in:
    np.testing.assert_array_equal(flat_in[key], flat_out[key])


def test_export_carries_taps_image_size_and_heads_and_import_refuses_a_different_run(
    trained_run, tmp_path):
  from adjax.errors import UserError
  from adjax.interop import import_projector
  workdir, angle, norm = trained_run
  # A run of DINOv2-B features from blocks 2/5/8/11 at 112 px: every tap has the backbone's
  # width, so only the metadata can tell them from the default 3/6/9/12. (Tiny 64-channel
  # params stand in for the real ones: check_backbone=False.)
  tapped = str(tmp_path / "tapped")
  config = run_layout.load_config(workdir)
  config.backbone.name = "dinov2-base"
  config.backbone.taps = (2, 5, 8, 11)
  config.image_size = 112
  run_layout.save_config(tapped, config)
  run_layout.save_best(tapped, "angle", angle, {"step": 5})
  run_layout.save_best(tapped, "norm", norm, {"step": 6})
  exported = {k: str(tmp_path / f"{k}.safetensors") for k in ("angle", "norm")}
  for kind, path in exported.items():
    assert main(["export", "--workdir", tapped, "--which", kind, "--out", path]) == 0
  run = str(tmp_path / "imported")
  import_projector(exported["angle"], run, check_backbone=False)
  got = run_layout.load_config(run)
  assert got.backbone.name == "dinov2-base" and tuple(got.backbone.taps) == (2, 5, 8, 11)
  assert got.image_size == 112 and got.projector.num_heads == HEADS
  # The norm params imported with another head count or taps would change how the angle
  # params, already there, are applied: refused, naming what differs.
  with pytest.raises(UserError, match=r"num_heads \(4 there, 8 here\)"):
    import_projector(exported["norm"], run, check_backbone=False,
                     overrides=[("projector.num_heads", 8)])
  with pytest.raises(UserError, match=r"taps \(\[2, 5, 8, 11\] there, \[3, 6, 9, 12\] here\)"):
    import_projector(exported["norm"], run, check_backbone=False,
                     overrides=[("backbone.taps", (3, 6, 9, 12))])
  assert run_layout.load_config(run).projector.num_heads == HEADS
  # The same settings add the other kind.
  import_projector(exported["norm"], run, check_backbone=False)
  assert read_run_params(run, "norm")[1]["step"] == 6


def test_builtin_pth_writer_is_read_by_torch_weights_only():
  rng = np.random.default_rng(3)
  tree = {"projectors": {"a": rng.normal(size=(3, 4)).astype(np.float32),
                         "b": np.float32(2.5), "c": np.arange(5, dtype=np.int64),
                         "d": rng.normal(size=(2, 3)).T}}  # non-contiguous float64
  loaded = torch.load(io.BytesIO(pth_bytes(tree)), weights_only=True)
  assert list(loaded) == ["projectors"] and list(loaded["projectors"]) == ["a", "b", "c", "d"]
  for key, value in tree["projectors"].items():
    got = loaded["projectors"][key].numpy()
    assert got.shape == np.shape(value) and got.dtype == np.asarray(value).dtype
    np.testing.assert_array_equal(got, value)


def test_export_latest_reads_the_newest_orbax_checkpoint(trained_run, tmp_path):
  from adjax.checkpointing import RunCheckpointer  # the trainer's own checkpoint writer
  workdir = str(tmp_path / "run")
  _, angle, _ = trained_run
  old = jax.tree_util.tree_map(np.asarray, angle)
  new = jax.tree_util.tree_map(lambda x: np.asarray(x) - 0.02, angle)
  checkpointer = RunCheckpointer(workdir, async_save=False)
  for step, params in ((10, old), (20, new)):
    checkpointer.save(step, {"params": params, "step": np.int32(step)}, {"epoch": 0})
  checkpointer.close()
  out = str(tmp_path / "latest.safetensors")
  assert main(["export", "--workdir", workdir, "--out", out, "--which", "latest"]) == 0
  got = st_load_numpy(out)
  want = projector_to_torch(jax.tree_util.tree_map(np.asarray, new))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_bad_files_give_one_clear_line_and_exit_2(trained_run, tmp_path, capsys):
  workdir, _, _ = trained_run
  good = str(tmp_path / "good_angle.pth")
  assert main(["export", "--workdir", workdir, "--out", good, "--no-torch"]) == 0
  capsys.readouterr()
  data = open(good, "rb").read()
  run = str(tmp_path / "r")

  truncated = tmp_path / "cut_angle.pth"
  truncated.write_bytes(data[:len(data) // 2])
  assert main(["import", str(truncated), "--backbone", BACKBONE, "--out", run]) == 2
  assert "cut_angle.pth" in one_error_line(capsys)

  text = tmp_path / "notes_angle.pth"
  text.write_text("this is not a checkpoint\n")
  assert main(["import", str(text), "--backbone", BACKBONE, "--out", run]) == 2
  assert "not a PyTorch checkpoint" in one_error_line(capsys)

  st = str(tmp_path / "w_angle.safetensors")
  assert main(["export", "--workdir", workdir, "--out", st]) == 0
  capsys.readouterr()
  st_data = open(st, "rb").read()
  cut_st = tmp_path / "cut_angle.safetensors"
  cut_st.write_bytes(st_data[:len(st_data) - 100])
  assert main(["import", str(cut_st), "--backbone", BACKBONE, "--out", run]) == 2
  assert "truncated" in one_error_line(capsys)

  other = str(tmp_path / "other_angle.pth")
  torch.save({"projectors": {"head.weight": torch.zeros(2, 2)}}, other)
  assert main(["import", other, "--backbone", BACKBONE, "--out", run]) == 2
  assert "not a projector checkpoint" in one_error_line(capsys)

  # The right file for the wrong backbone: its dims are named.
  assert main(["import", good, "--backbone", "dinov2-base", "--out", run]) == 2
  assert "dims" in one_error_line(capsys)

  plain = str(tmp_path / "projector.pth")
  os.link(good, plain)
  assert main(["import", plain, "--backbone", BACKBONE, "--out", run]) == 2
  assert "--which" in one_error_line(capsys)

  assert main(["import", str(tmp_path / "missing_angle.pth"), "--backbone", BACKBONE,
               "--out", run]) == 2
  assert "not found" in one_error_line(capsys)
  assert not os.path.exists(run)  # nothing half-written by the failed imports

  assert main(["export", "--workdir", str(tmp_path / "nope"), "--out", good]) == 2
  assert "not found" in one_error_line(capsys)
  assert main(["export", "--workdir", workdir, "--out", str(tmp_path / "x.bin")]) == 2
  assert ".safetensors" in one_error_line(capsys)
  assert main(["export", "--workdir", workdir, "--out", good, "--which", "latest"]) == 2
  assert "checkpoints" in one_error_line(capsys)


def test_written_files_have_the_mode_of_a_plain_open(trained_run, tmp_path):
  # mkstemp creates 0600 files: exported weights and run files must be readable by the
  # colleagues the umask lets read them.
  from adjax.io.safetensors import save_safetensors
  from adjax.io.pth_writer import write_pth
  _, angle, _ = trained_run
  state_dict = projector_to_torch(angle)
  old = os.umask(0o027)
  files._new_file_mode.cache_clear()
  try:
    paths = [str(tmp_path / name) for name in ("a.json", "b.safetensors", "c.pth", "d.pth")]
    files.write_json(paths[0], {"a": 1})
    save_safetensors(paths[1], state_dict)
    write_pth(paths[2], {"projectors": state_dict}, use_torch=False)
    write_pth(paths[3], {"projectors": state_dict}, use_torch=True)
    run_layout.save_best(str(tmp_path / "run"), "angle", angle, {"step": 1})
    paths += [str(p) for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(paths) == 6
    for path in paths:
      assert os.stat(path).st_mode & 0o777 == 0o640, path
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  finally:
    os.umask(old)
    files._new_file_mode.cache_clear()
