"""Damaged run files: a resume falls back past checkpoints that cannot be restored (moved aside,
never deleted), and every other file a run reads back is refused in one line that names it.

One tiny real run (3 steps, a checkpoint after each) is made once; each test damages a copy."""

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

from adjax import cli, run_layout
from adjax.checkpointing import RunCheckpointer, read_run_params
from adjax.errors import UserError
from adjax.io import files
from adjax.pretrain.derived import load_centers, load_references
from run_helpers import dataset, tiny_config  # noqa: F401 (a fixture)

LEVELS = (64, 64, 64, 64)   # tiny-vit's level widths


def _config(data_root):
  config = tiny_config(data_root)
  config.optim.max_steps = 3
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 3
  return config


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
  from adjax.pretrain import pretrain
  workdir = str(tmp_path_factory.mktemp("run") / "run")
  pretrain(_config(dataset), workdir, progress=False)
  return workdir


@pytest.fixture
def copy(run, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(run, target)
  return target


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(run_layout.checkpoints_dir(workdir)) if n.isdigit())


def _truncate_data_file(step_dir):
  """Cuts the largest array file of the step's state item in half (a copy cut short)."""
  paths = [p for p in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(p)]
  biggest = max(paths, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _one_line_error(argv, capsys):
  status = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  return err[0]


# --------------------------------------------------------------------- checkpoints
def test_resume_falls_back_past_damaged_checkpoints(dataset, copy, caplog):
  from adjax.pretrain import pretrain
  checkpoints = run_layout.checkpoints_dir(copy)
  assert _steps(copy) == [1, 2, 3]
  _truncate_data_file(os.path.join(checkpoints, "3"))        # the newest: a truncated file
  shutil.rmtree(os.path.join(checkpoints, "2", "data"))      # the one before: an item lost
  with open(run_layout.metrics_path(copy), "ab") as f:       # and a metrics log with garbage
    f.write(b'\x00\xff\xfe garbage\n{"step": "three", "loss": 1}\n')
  with caplog.at_level(logging.WARNING, logger="adjax"):
    summary = pretrain(_config(dataset), copy, progress=False)
  assert summary["steps"] == 3 and not summary["preempted"]
  warned = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warned) == 2 and os.path.join(checkpoints, "3") in warned[0], warned
  assert all("\n" not in line for line in warned)
  # The damaged steps are kept aside, and the run saved steps 2 and 3 again, restorable.
  aside = run_layout.corrupt_checkpoints_dir(copy)
  assert sorted(os.listdir(aside)) == ["2", "3"]
  assert not os.path.exists(os.path.join(aside, "2", "data"))
  assert _steps(copy) == [1, 2, 3]
  assert read_run_params(copy, "latest")[1]["step"] == 3
  logged = [json.loads(line)["step"] for line in open(run_layout.metrics_path(copy))]
  assert logged == [1, 2, 3]


def test_restore_skips_an_empty_step_folder(copy):
  os.makedirs(os.path.join(run_layout.checkpoints_dir(copy), "7"))   # stray, no items
  checkpointer = RunCheckpointer(copy)
  try:
    _, data_state, step = checkpointer.restore(None)
  finally:
    checkpointer.close()
  assert step == 3 and isinstance(data_state, dict)
  assert os.listdir(run_layout.corrupt_checkpoints_dir(copy)) == ["7"]


def test_no_restorable_checkpoint_is_one_user_error(copy):
  checkpoints = run_layout.checkpoints_dir(copy)
  for step in _steps(copy):
    shutil.rmtree(os.path.join(checkpoints, str(step), "data"))
  checkpointer = RunCheckpointer(copy)
  try:
    with pytest.raises(UserError, match="no checkpoint in .* can be restored") as caught:
      checkpointer.restore(None)
  finally:
    checkpointer.close()
  assert checkpoints in str(caught.value) and "\n" not in str(caught.value)
  # Nothing deleted: all three are kept, out of orbax's sight.
  assert sorted(os.listdir(run_layout.corrupt_checkpoints_dir(copy))) == ["1", "2", "3"]
  assert _steps(copy) == []


def test_empty_checkpoints_folder(copy, capsys):
  checkpoints = run_layout.checkpoints_dir(copy)
  shutil.rmtree(checkpoints)
  os.makedirs(os.path.join(checkpoints, "5"))       # only an empty step folder
  checkpointer = RunCheckpointer(copy)
  try:
    with pytest.raises(UserError, match="can be restored"):
      checkpointer.restore(None)
    assert checkpointer.latest_step() is None       # set aside: a rerun starts afresh
  finally:
    checkpointer.close()
  shutil.rmtree(checkpoints)
  os.makedirs(checkpoints)                          # nothing at all
  line = _one_line_error(["export", "--workdir", copy, "--out", os.path.join(copy, "p.pth"),
                          "--which", "latest", "--no-torch"], capsys)
  assert "holds no finished checkpoint" in line and checkpoints in line


def test_export_latest_of_a_damaged_run(copy, capsys, caplog):
  checkpoints = run_layout.checkpoints_dir(copy)
  _truncate_data_file(os.path.join(checkpoints, "3"))
  # The newest is damaged: the one before is read, with a warning naming the damaged one
  # (a read-only command moves nothing).
  with caplog.at_level(logging.WARNING, logger="adjax"):
    _, meta = read_run_params(copy, "latest")
  assert meta["step"] == 2 and _steps(copy) == [1, 2, 3]
  assert any(os.path.join(checkpoints, "3") in r.getMessage() for r in caplog.records)
  for step in (1, 2):
    shutil.rmtree(os.path.join(checkpoints, str(step), "state"))
  line = _one_line_error(["export", "--workdir", copy, "--out", os.path.join(copy, "p.pth"),
                          "--which", "latest", "--no-torch"], capsys)
  assert "no checkpoint in" in line and os.path.join(checkpoints, "3") in line
  assert _steps(copy) == [1, 2, 3]


# --------------------------------------------------------------------- other run files
@pytest.mark.parametrize("content, says", [
    (b'{"optim": {"lr": ', "not valid JSON"),
    (b"\x89PNG\x00\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"optim": {"lr": "fast"}}', "optim.lr must be float"),
    (b'{"optim": 3}', "optim must be a section"),
    (b'{"loss": {"center": 1}}', "loss.center must be bool"),
])
def test_a_bad_config_json_is_named(tmp_path, capsys, content, says):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(run_layout.config_path(workdir), "wb") as f:
    f.write(content)
  with pytest.raises(UserError, match=says) as caught:
    run_layout.load_config(workdir)
  assert run_layout.config_path(workdir) in str(caught.value)
  # The command that reads it back says so in one line.
  line = _one_line_error(["pretrain", "--workdir", workdir], capsys)
  assert run_layout.config_path(workdir) in line and says in line


def test_a_bad_centres_file_is_named(copy):
  path = run_layout.centers_path(copy)
  assert [c.shape for c in load_centers(copy, LEVELS)] == [(64,)] * 4
  for write in (lambda: np.savez(path, l1=np.zeros(64), l2=np.zeros(64)),          # keys
                lambda: np.savez(path, **{f"l{k}": np.zeros(8) for k in range(1, 5)}),  # shape
                lambda: open(path, "r+b").truncate(100)):                          # truncated
    write()
    with pytest.raises(UserError) as caught:
      load_centers(copy, LEVELS)
    assert path in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_reference_bank_is_named(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, "references.npz")
  good = dict(class_names=np.asarray(["a/x", "a/y"]), view_names=np.asarray(["v"]),
              paths=np.full((2, 3), "p"), **{f"l{k}": np.zeros((2, 3, 2, 2, 64), np.float32)
                                            for k in range(1, 5)})
  np.savez(path, **good)
  assert len(load_references(workdir, LEVELS)["levels"]) == 4
  for change in ({"l2": np.zeros((2, 3, 2, 2, 8), np.float32)},     # another width
                 {"paths": np.full((3, 3), "p")},                     # groups of other classes
                 {"l4": None}):                                       # a level missing
    broken = {k: v for k, v in {**good, **change}.items() if v is not None}
    np.savez(path, **broken)
    with pytest.raises(UserError) as caught:
      load_references(workdir, LEVELS)
    assert path in str(caught.value)
  with open(path, "r+b") as f:
    f.truncate(200)
  with pytest.raises(UserError, match="not a readable .npz"):
    load_references(workdir, LEVELS)


def test_metrics_log_skips_bad_lines_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "wb") as f:
    f.write(b'{"step": 1, "loss": 2.0}\n\x00\xff\xfe\n{"step": "2", "loss": 1.0}\n'
            b'[3]\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
  with caplog.at_level(logging.WARNING, logger="adjax"):
    assert [r["step"] for r in files.read_jsonl(path)] == [1, 3]
  (message,) = [r.getMessage() for r in caplog.records]
  assert path in message and "line 2, 3, 4" in message   # the torn last line is not counted
  files.truncate_jsonl(path, 2)
  assert [json.loads(line) for line in open(path)] == [{"step": 1, "loss": 2.0}]


def test_a_bad_selection_meta_is_named(copy):
  from adjax.pretrain.loop import _BestTracker
  meta_path = run_layout.best_meta_path(copy, "angle")
  for meta in ('["step", 3]', '{"step": 3, "score": "high"}', '{"step": "3"}', "\x00garbage"):
    with open(meta_path, "w") as f:
      f.write(meta)
    with pytest.raises(UserError) as caught:
      _BestTracker(copy)
    assert meta_path in str(caught.value)
    with pytest.raises(UserError):
      read_run_params(copy, "angle")
  params_path = run_layout.best_params_path(copy, "norm")
  with open(params_path, "r+b") as f:
    f.truncate(50)
  with pytest.raises(UserError, match="not a readable params"):
    read_run_params(copy, "norm")
