"""The image check before pretraining: an unreadable image or mask stops the run before its
first step (data.skip_unreadable_share 0), or is dropped, named and listed in unreadable.json
(within the share); a resume reuses the check instead of decoding every file again."""

import logging
import os
import shutil

import pytest

from adjax import run_layout
from adjax.errors import UserError
from adjax.io import files
from adjax.pretrain import pretrain, pretrain_records
from adjax.pretrain import image_check
from data_pipelines import images
from run_helpers import tiny_config


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
  """The tiny embedded set with one normal image truncated and one anomalous image's mask
  replaced by garbage: (pretraining root, the truncated image, the garbage mask)."""
  from data_pipelines.embedded import generate_embedded_dataset
  root = tmp_path_factory.mktemp("damaged")
  summary = generate_embedded_dataset(str(root), image_size=56, pretrain_classes=2,
                                      eval_classes=1, images_per_class=12)
  records = pretrain_records(tiny_config(summary["pretrain_root"]))
  image = next(r.image_path for r in records if r.label == 0)
  mask = next(r.mask_path for r in records if r.label == 1)
  data = open(image, "rb").read()
  with open(image, "wb") as f:
    f.write(data[: len(data) // 2])
  with open(mask, "wb") as f:
    f.write(b"not an image at all")
  return summary["pretrain_root"], image, mask, len(records)


def _counting(monkeypatch) -> list:
  """Counts the calls of the decoder check (the scan), passing them on."""
  calls = []
  original = images.check_records

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(images, "check_records", counted)
  return calls


def test_unreadable_files_stop_the_run_before_training(damaged, tmp_path):
  root, image, mask, count = damaged
  workdir = str(tmp_path / "run")
  config = tiny_config(root)
  assert config.data.skip_unreadable_share == 0.0   # the default: any unreadable file stops it
  with pytest.raises(UserError) as err:
    pretrain(config, workdir, progress=False)
  message = str(err.value)
  assert "\n" not in message
  assert f"2 of {count} pretraining images are unreadable" in message
  assert "skip_unreadable_share=0" in message
  assert os.path.basename(image) in message and os.path.basename(mask) in message
  assert not os.path.exists(run_layout.checkpoints_dir(workdir))
  assert not run_layout.has_checkpoint(workdir)
  assert not os.path.exists(run_layout.config_path(workdir))   # the attempt changed nothing
  listed = files.read_json(run_layout.unreadable_path(workdir))
  assert sorted(e["file"] for e in listed["unreadable"]) == sorted([image, mask])
  config.data.skip_unreadable_share = 1.5
  wanted = r"config.data.skip_unreadable_share = 1.5: expected a finite number in \[0, 1\]"
  with pytest.raises(UserError, match=wanted):
    pretrain(config, workdir, progress=False)


def test_unreadable_files_within_the_share_are_dropped_and_resume_reuses_the_check(
    damaged, tmp_path, monkeypatch, caplog):
  root, image, mask, count = damaged
  workdir = str(tmp_path / "run")
  config = tiny_config(root)
  config.data.skip_unreadable_share = 0.5
  config.optim.max_steps = 2
  calls = _counting(monkeypatch)
  with caplog.at_level(logging.WARNING, logger="adjax.train"):
    summary = pretrain(config, workdir, progress=False)
  assert summary["steps"] == 2 and calls == [1]
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(image in m for m in warned) and any(mask in m for m in warned)
  assert run_layout.has_checkpoint(workdir)
  listed = files.read_json(run_layout.unreadable_path(workdir))
  assert listed["checked"] == count and listed["share"] == pytest.approx(2 / count)
  assert sorted(e["file"] for e in listed["unreadable"]) == sorted([image, mask])
  bad_images = {e["image"] for e in listed["unreadable"]}
  kept = image_check.checked_records(pretrain_records(config), config, workdir)
  assert len(kept) == count - 2 and not bad_images & {r.image_path for r in kept}

  # The resume (two more steps) reuses the check: no file is decoded again.
  calls.clear()
  config.optim.max_steps = 4
  with caplog.at_level(logging.INFO, logger="adjax.train"):
    summary = pretrain(config, workdir, progress=False)
  assert summary["steps"] == 4 and calls == []
  assert "resumed from step 2" in caplog.text


def test_a_changed_file_is_checked_again(damaged, tmp_path, monkeypatch):
  original, image, _, count = damaged
  data = os.path.join(str(tmp_path), "data")   # a copy: the shared damaged set stays as it is
  shutil.copytree(os.path.dirname(original), data)
  root = os.path.join(data, os.path.basename(original))
  config = tiny_config(root)
  config.data.skip_unreadable_share = 0.5
  workdir = str(tmp_path / "run")
  calls = _counting(monkeypatch)
  assert len(image_check.checked_records(pretrain_records(config), config, workdir,
                                         progress=False)) == count - 2
  assert len(image_check.checked_records(pretrain_records(config), config, workdir,
                                         progress=False)) == count - 2
  assert calls == [1]
  # The truncated image repaired (another size and time): the records are checked again.
  copy = image.replace(os.path.dirname(original), data, 1)
  good = next(r.image_path for r in pretrain_records(config)
              if r.label == 0 and r.image_path != copy)
  shutil.copyfile(good, copy)
  kept = image_check.checked_records(pretrain_records(config), config, workdir,
                                     progress=False)
  assert calls == [1, 1] and len(kept) == count - 1
