"""OS errors the user can act on are one line and exit 2 naming the path (adjax/cli.py), an
atomic write that fails leaves nothing behind (adjax/io/files.py), and exports write regular
files only: /dev/null, a folder or a symlink to one is refused, never replaced."""

from __future__ import annotations

import errno
import os
import stat

import jax
import numpy as np
import pytest

from adjax import run_layout
from adjax.cli import main
from adjax.errors import UserError
from adjax.io import files
from run_helpers import one_error_line

# tiny-vit: a registered backbone with four levels of 64 channels (no weights are read).
BACKBONE, DIMS, HEADS, NUM_REF = "tiny-vit", (64, 64, 64, 64), 4, 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run as pretraining leaves it (config.json, best/{angle,norm}), and its export."""
  from adjax.configs import default_config
  from adjax.models.projector import init_projector
  workdir = str(tmp_path_factory.mktemp("run"))
  params = jax.tree_util.tree_map(np.asarray, init_projector(
      jax.random.PRNGKey(0), DIMS, num_heads=HEADS, num_ref_tokens=NUM_REF))
  config = default_config()
  config.backbone.name = BACKBONE
  config.projector.num_heads = HEADS
  config.projector.num_ref_tokens = NUM_REF
  run_layout.save_config(workdir, config)
  for kind in run_layout.KINDS:
    run_layout.save_best(workdir, kind, params, {"step": 3, "metrics": {}})
  exported = os.path.join(workdir, "p_angle.safetensors")
  assert main(["export", "--workdir", workdir, "--out", exported]) == 0
  return workdir, exported


def _no_temporary_files(folder) -> None:
  assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")], os.listdir(folder)


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EFBIG, "File too large")])
def test_full_disk_is_one_line_and_leaves_the_old_file(code, reason, run_dir, tmp_path,
                                                       monkeypatch, capsys):
  workdir, _ = run_dir
  out = tmp_path / "p.safetensors"
  out.write_bytes(b"old")

  def fsync(fd):   # what a full disk does: the write itself fails, naming no file
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(files.os, "fsync", fsync)
  capsys.readouterr()
  assert main(["export", "--workdir", workdir, "--out", str(out)]) == 2
  assert one_error_line(capsys) == f"adjax export: error: {out}: {reason}"
  assert out.read_bytes() == b"old"
  _no_temporary_files(tmp_path)
  # ADJAX_DEBUG=1: the traceback instead.
  monkeypatch.setenv("ADJAX_DEBUG", "1")
  with pytest.raises(OSError) as err:
    main(["export", "--workdir", workdir, "--out", str(out)])
  assert err.value.errno == code
  _no_temporary_files(tmp_path)


def test_read_only_folder_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
  workdir, _ = run_dir
  # EROFS as a read-only mount reports it (simulated: mounting needs privileges).
  real_mkstemp = files.tempfile.mkstemp

  def mkstemp(dir=None, **kwargs):
    if str(dir).startswith(str(tmp_path / "ro")):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
    return real_mkstemp(dir=dir, **kwargs)

  monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
  (tmp_path / "ro").mkdir()
  assert main(["export", "--workdir", workdir, "--out", str(tmp_path / "ro" / "p.pth"),
               "--no-torch"]) == 2
  assert one_error_line(capsys) == (f"adjax export: error: {tmp_path / 'ro'}: "
                                     "Read-only file system")


def test_unwritable_folder_is_one_line(run_dir, tmp_path, capsys):
  if os.geteuid() == 0:
    pytest.skip("running as root: chmod does not keep root from writing")
  workdir, _ = run_dir
  folder = tmp_path / "locked"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    assert main(["export", "--workdir", workdir, "--out", str(folder / "p.pth"),
                 "--no-torch"]) == 2
    line = one_error_line(capsys)
  finally:
    folder.chmod(0o700)
  assert line.startswith(f"adjax export: error: {folder}") and "Permission denied" in line


def test_an_out_under_a_file_or_that_is_a_file(run_dir, tmp_path, capsys):
  workdir, exported = run_dir
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  under = a_file / "sub"
  # export: a path under a file.
  assert main(["export", "--workdir", workdir, "--out", str(under / "p.pth"), "--no-torch"]) == 2
  line = one_error_line(capsys)
  assert line.startswith(f"adjax export: error: {a_file}") and "Not a directory" in line
  # import: a run folder that is a file, or lies under one.
  base = ["import", exported, "--which", "angle"]
  assert main(base + ["--out", str(a_file)]) == 2
  assert one_error_line(capsys) == f"adjax import: error: {a_file}: File exists"
  assert main(base + ["--out", str(under)]) == 2
  line = one_error_line(capsys)
  assert line.startswith(f"adjax import: error: {under}") and "Not a directory" in line
  # evaluate: a results folder that is a file, or lies under one (refused before the backbone).
  flags = [f"--config.eval.root={tmp_path}", "--config.eval.features=original,residual"]
  assert main(["evaluate", "--out", str(a_file)] + flags) == 2
  assert one_error_line(capsys) == f"adjax evaluate: error: {a_file}: Not a directory"
  assert main(["evaluate", "--out", str(under)] + flags) == 2
  line = one_error_line(capsys)
  assert line.startswith(f"adjax evaluate: error: {under}") and "Not a directory" in line
  assert a_file.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_an_unexpected_os_error_keeps_its_traceback(run_dir, tmp_path, monkeypatch):
  workdir, _ = run_dir

  def fsync(fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  monkeypatch.setattr(files.os, "fsync", fsync)
  with pytest.raises(OSError) as err:
    main(["export", "--workdir", workdir, "--out", str(tmp_path / "p.pth"), "--no-torch"])
  assert err.value.errno == errno.EIO
  _no_temporary_files(tmp_path)


@pytest.mark.parametrize("target", ["devnull", "symlink", "folder", "symlink_to_folder",
                                    "fifo"])
def test_export_refuses_a_target_that_is_not_a_regular_file(target, run_dir, tmp_path,
                                                            capsys):
  workdir, _ = run_dir
  if target == "devnull":
    out = "/dev/null"
  elif target == "symlink":
    out = str(tmp_path / "null.pth")
    os.symlink("/dev/null", out)
  elif target == "fifo":
    out = str(tmp_path / "pipe.safetensors")
    os.mkfifo(out)
  else:
    folder = tmp_path / "d.pth"
    folder.mkdir()
    out = str(folder)
    if target == "symlink_to_folder":
      out = str(tmp_path / "link.pth")
      os.symlink(folder, out)
  before = sorted(os.listdir(tmp_path))
  assert main(["export", "--workdir", workdir, "--out", out, "--no-torch"]) == 2
  line = one_error_line(capsys)
  assert line.startswith(f"adjax export: error: {out} is ") and "regular file" in line
  assert sorted(os.listdir(tmp_path)) == before
  assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
  # The writers refuse on their own too (a library caller that skips export's check).
  with pytest.raises(UserError, match="regular file"):
    files.atomic_write(out, lambda f: f.write(b"x"))
  assert sorted(os.listdir(tmp_path)) == before


def test_export_overwrites_a_regular_file_and_through_a_symlink_to_one(run_dir, tmp_path):
  workdir, _ = run_dir
  out = tmp_path / "p.safetensors"
  out.write_bytes(b"old")
  link = tmp_path / "link.safetensors"
  os.symlink(out, link)
  assert main(["export", "--workdir", workdir, "--out", str(out)]) == 0
  assert out.read_bytes() != b"old"
  assert main(["export", "--workdir", workdir, "--out", str(link)]) == 0
