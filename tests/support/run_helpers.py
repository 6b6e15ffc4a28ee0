"""Shared by the pretraining-run tests: a tiny run config and the embedded dataset."""

import os

import pytest

from adjax.configs import default_config


def tiny_config(data_root: str, with_validation: bool = False):
  c = default_config()
  if with_validation:  # select checkpoints on the held-out classes at the end of each epoch
    c.data.val_format = "mvtec"
    c.data.val_root = os.path.join(os.path.dirname(data_root), "eval")
    c.train.eval_every_epochs = 1
    c.eval.shots = 2
  c.backbone.name = "tiny-vit"
  c.image_size = 56
  c.data.pretrain_root = data_root
  c.data.batch_size = 4
  c.data.shots = (1, 2)
  c.data.max_shots = 2
  c.projector.num_heads = 4
  c.projector.num_ref_tokens = 32
  c.optim.lr = 1e-3
  c.optim.max_steps = 6
  c.train.dtype = "float32"
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.center_shots = 2
  c.train.center_images_per_group = 2
  c.loss.angle_block_size = 64
  return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from data_pipelines.embedded import generate_embedded_dataset
  root = tmp_path_factory.mktemp("embedded")
  summary = generate_embedded_dataset(str(root), image_size=56, pretrain_classes=2,
                                      eval_classes=1, images_per_class=12)
  return summary["pretrain_root"]


def _eval_config(dataset, methods, features, tsne=False):
  """tiny_config evaluating `methods` on `features` of the embedded set's held-out class."""
  config = tiny_config(dataset)
  config.eval.format = "mvtec"
  config.eval.root = os.path.join(os.path.dirname(dataset), "eval")
  config.eval.methods = methods
  config.eval.features = features
  config.eval.shots = 2
  config.eval.tsne = tsne
  return config


def one_error_line(capsys) -> str:
  """The single line a command printed on stderr for a user error (no traceback)."""
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return lines[0]
