"""What a pretraining run is set up from: its records (one dataset folder, several merged, or
packed shards), its loader (this process's shard and share of the batch) and the compiled
step's settings."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from adjax.errors import UserError
from adjax.from_config import compute_dtype, split_classes
from adjax.pretrain.step import StepSettings
from data_pipelines import index
from data_pipelines.device_augment import augment_placement


def _distinct_paths(paths: list[str], setting: str) -> None:
  """Refuses a folder or pack named twice: it would be read twice, as two datasets."""
  seen = {}
  for path in paths:
    key = os.path.realpath(os.path.expanduser(path))
    if key in seen:
      raise UserError(f"{setting} names {seen[key]!r} and {path!r}, the same place twice: "
                      "each dataset once")
    seen[key] = path


def pretrain_records(config: ml_collections.ConfigDict) -> list:
  """The pretraining index: packed ArrayRecord shards or dataset folders.

  Several datasets merge into one index: comma-separated `data.pretrain_root` folders (with
  one `data.pretrain_format`, or one per folder) or `data.pretrain_tfds_dir` packs. Reference
  images are drawn within (dataset, class, view), so datasets that share a class name stay
  apart; two folders or packs of one format are told apart as "<format>#<position>" (1-based,
  in the list). `data.pretrain_classes` may name a class as "dataset/class".
  """
  classes = split_classes(config.data.pretrain_classes)
  qualified = bool(classes) and any("/" in c for c in classes)
  if config.data.get("pretrain_tfds_dir"):
    from data_pipelines.tfds_builders import packed_records
    packs = split_classes(config.data.pretrain_tfds_dir)
    _distinct_paths(packs, "config.data.pretrain_tfds_dir")
    per_source = [packed_records(pack) for pack in packs]
    records = index.merge_sources([r[0].dataset if r else "" for r in per_source], per_source)
    if classes:
      # As the folder readers do: a requested class that is not there is an error, not a
      # silently smaller pretraining set.
      records = index.select_classes(records, classes, config.data.pretrain_tfds_dir)
  else:
    roots = split_classes(config.data.pretrain_root)
    if not roots:
      raise ValueError("config.data.pretrain_root is empty: give the pretraining dataset's "
                       "folder (--config.data.pretrain_root=DIR)")
    _distinct_paths(roots, "config.data.pretrain_root")
    formats = split_classes(config.data.pretrain_format) or []
    if len(formats) == 1:
      formats = formats * len(roots)
    if len(formats) != len(roots):
      raise UserError(f"config.data.pretrain_format names {len(formats)} formats for "
                      f"{len(roots)} folders in config.data.pretrain_root: give one format, "
                      "or one per folder (comma-separated, in the same order)")
    if len(roots) == 1 and not qualified:
      records = index.read_dataset(formats[0], roots[0], classes)
    else:
      records = index.merge_sources(formats, [index.read_dataset(fmt, root)
                                              for fmt, root in zip(formats, roots)])
      if classes:
        records = index.select_classes(records, classes, config.data.pretrain_root)
  if not records:
    raise ValueError(f"no pretraining images found in {config.data.pretrain_root!r}")
  return records


def resolve_augment_place(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the config with `data.augment_on` resolved to "host" or "device"
  (data_pipelines.device_augment.augment_placement: "auto" is the device on accelerators).

  Resolved before the run's settings are compared with a resumed run's, so that the run
  folder records where its views were augmented: a resume on another platform would augment
  differently and is refused as a changed setting instead of drifting silently.
  """
  _, on_device = augment_placement(True, config.data.get("augment_on", "host"),
                                   jax.default_backend())
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.augment_on = "device" if on_device else "host"
  return config


def device_augment(config: ml_collections.ConfigDict) -> bool:
  """Whether the step colour-augments the views (config resolved by resolve_augment_place)."""
  return augment_placement(bool(config.data.augment), config.data.get("augment_on", "host"),
                           jax.default_backend())[1]


def step_settings(config: ml_collections.ConfigDict, backbone,
                  mesh: Optional[Mesh] = None) -> StepSettings:
  """The compiled step's settings from a run config; `mesh` splits the angle loss's rows."""
  return StepSettings(
      level_strides=tuple(backbone.level_strides), num_heads=config.projector.num_heads,
      temperature=config.loss.temperature, use_angle=config.loss.angle,
      use_norm=config.loss.norm, use_center=config.loss.center,
      use_residual=config.loss.residual, angle_block_size=config.loss.angle_block_size,
      label_threshold_share=config.data.label_threshold_share,
      max_similarities=config.train.max_similarities, compute_dtype=compute_dtype(config),
      attention=config.projector.get("attention", "auto"), device_augment=device_augment(config),
      mesh=mesh)


def make_loader(config: ml_collections.ConfigDict, records: Sequence, backbone, *,
                load_references: bool = True):
  """This process's pretraining loader (its shard of the data, its share of the batch)."""
  from data_pipelines.pretrain_pipeline import make_pretrain_loader
  processes = jax.process_count()
  if config.data.batch_size % jax.device_count():
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple of "
                     f"the device count {jax.device_count()}")
  patch = max(backbone.level_strides)
  return make_pretrain_loader(
      records, image_size=config.image_size, batch_size=config.data.batch_size // processes,
      shots=tuple(config.data.shots), max_shots=config.data.max_shots,
      anomaly_share=config.data.anomaly_share or None,
      augment=bool(config.data.augment) and not device_augment(config),
      patch_size=patch, label_threshold=int(config.data.label_threshold_share * patch * patch),
      seed=config.seed, shard_index=jax.process_index(), shard_count=processes,
      num_workers=config.data.num_workers, load_references=load_references,
      jpeg_draft=bool(config.data.get("jpeg_draft", False)))
