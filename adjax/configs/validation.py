"""Checks a finished config before anything runs: every setting of default.py for its type,
range and finiteness, and the relations between settings.

A bad value found here is one line naming the setting (`config.optim.lr = nan: expected a
finite number > 0`) instead of a run that writes a NaN projector, a traceback from deep inside
the loss, or an error that names no setting. Every problem found is reported at once, so a
user fixes a command line in one go.

Only the keys a config has are checked: configs read from an older run's config.json or built
by hand may lack some, and the code that reads them falls back to its defaults. Keys that
neither default.py nor the demo's config knows (a method's settings, a sweep file's own keys)
are left to the code that reads them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from adjax.errors import UserError

# A check returns None when the value is fine, else what was expected ("a finite number > 0").
Check = Callable[[Any], Optional[str]]
_MISSING = object()


# ----------------------------------------------------------------------------- value checks
def _is_int(value: Any) -> bool:
  # bool is an int in Python, but `depth=True` is a mistake, not the number 1.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Check:
  """An int (not a bool) within [low, high] (either bound may be None)."""
  def check(value: Any) -> Optional[str]:
    if _is_int(value) and (low is None or value >= low) and (high is None or value <= high):
      return None
    if low is not None and high is not None:
      return f"expected an integer in [{low}, {high}]"
    if low is not None:
      return f"expected an integer >= {low}"
    return "expected an integer" if high is None else f"expected an integer <= {high}"
  return check


def number(low: Optional[float] = None, high: Optional[float] = None, *,
           low_open: bool = False, high_open: bool = False) -> Check:
  """A finite real number (int or float, not a bool) within the bounds (open or closed)."""
  def describe() -> str:
    if low is not None and high is not None:
      return (f"expected a finite number in {'(' if low_open else '['}{low:g}, {high:g}"
              f"{')' if high_open else ']'}")
    if low is not None:
      return f"expected a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
      return f"expected a finite number {'<' if high_open else '<='} {high:g}"
    return "expected a finite number"

  def check(value: Any) -> Optional[str]:
    if not _is_number(value) or not math.isfinite(float(value)):
      return describe()
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
      return describe()
    if high is not None and (v >= high if high_open else v > high):
      return describe()
    return None
  return check


def boolean(value: Any) -> Optional[str]:
  return None if isinstance(value, bool) else "expected true or false"


def text(value: Any) -> Optional[str]:
  return None if isinstance(value, str) else "expected a string"


def one_of(options: Sequence[str], *, lower: bool = False) -> Check:
  """A string among `options` (compared in lower case when `lower`)."""
  def check(value: Any) -> Optional[str]:
    if isinstance(value, str) and (value.lower() if lower else value) in options:
      return None
    return f"expected one of {', '.join(options)}"
  return check


def comma_list_of(options: Sequence[str]) -> Check:
  """A comma-separated string whose every item is among `options` (at least one item)."""
  def check(value: Any) -> Optional[str]:
    if isinstance(value, str):
      items = [item.strip() for item in value.split(",") if item.strip()]
      if items and all(item in options for item in items):
        return None
    return f"expected one of {', '.join(options)} (or several, comma-separated)"
  return check


def sequence_of(options: Sequence[str], *, lower: bool = False) -> Check:
  """A non-empty tuple or list of distinct strings among `options`."""
  def check(value: Any) -> Optional[str]:
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
      names = [v.lower() if lower else v for v in value]
      if all(n in options for n in names) and len(set(names)) == len(names):
        return None
    return f"expected a non-empty list of distinct names among {', '.join(options)}"
  return check


def integers(low: int, *, optional: bool = False, ascending: bool = False) -> Check:
  """A non-empty tuple or list of ints >= low (None too when `optional`)."""
  def check(value: Any) -> Optional[str]:
    if value is None and optional:
      return None
    if (isinstance(value, (tuple, list)) and value
        and all(_is_int(v) and v >= low for v in value)
        and (not ascending or all(a < b for a, b in zip(value, value[1:])))):
      return None
    order = ", strictly ascending" if ascending else ""
    return (f"expected a non-empty list of integers >= {low}{order}"
            + (" (or none: the default)" if optional else ""))
  return check


def _resize_table(value: Any) -> Optional[str]:
  # eval.class_resize: {class name: short side}; 0 means "the crop size", as eval.resize.
  table = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  if isinstance(table, Mapping) and all(isinstance(k, str) and _is_int(v) and v >= 0
                                        for k, v in table.items()):
    return None
  return "expected {class name: integer >= 0}"


def _mapping(value: Any) -> Optional[str]:
  ok = isinstance(value, (ml_collections.ConfigDict, Mapping))
  return None if ok else "expected a group {name: settings}"


# ----------------------------------------------------------------------------- the settings
def _rules() -> dict[str, Check]:
  """Every setting of default.py (and the demo's) with its check. The registries are imported
  here, not at module level: they pull in JAX, which a config file need not."""
  from adjax.detector.thresholds import RULES
  from adjax.evaluate.features import FEATURE_KINDS
  from adjax.methods import METHODS
  from adjax.models.backbones import BACKBONES
  from adjax.models.reference_attention import IMPLEMENTATIONS
  from adjax.from_config import _COMPUTE_DTYPES
  from data_pipelines.device_augment import AUGMENT_ON
  from data_pipelines.readers import READERS

  readers = tuple(sorted(READERS))
  return {
      "seed": integer(0),
      "image_size": integer(1),
      "backbone.name": one_of(tuple(BACKBONES)),
      "backbone.weights": text,
      "backbone.cache_dir": text,
      "backbone.taps": integers(1, optional=True),
      "data.pretrain_format": comma_list_of(readers),
      "data.pretrain_root": text,
      "data.pretrain_classes": text,
      "data.pretrain_tfds_dir": text,
      "data.val_format": one_of(readers),
      "data.val_root": text,
      "data.val_classes": text,
      "data.batch_size": integer(1),
      "data.shots": integers(1),
      "data.max_shots": integer(1),
      "data.anomaly_share": number(0, 1),
      "data.augment": boolean,
      "data.augment_on": one_of(AUGMENT_ON),
      "data.jpeg_draft": boolean,
      "data.num_workers": integer(0),
      "data.label_threshold_share": number(0, 1),
      "data.skip_unreadable_share": number(0, 1),
      "projector.num_heads": integer(1),
      "projector.num_ref_tokens": integer(1),
      "projector.depth": integer(1),
      "projector.attention": one_of(IMPLEMENTATIONS),
      "loss.angle": boolean,
      "loss.norm": boolean,
      "loss.temperature": number(0, low_open=True),
      "loss.center": boolean,
      "loss.residual": boolean,
      "loss.angle_block_size": integer(1),
      "optim.lr": number(0, low_open=True),
      "optim.weight_decay": number(0),
      "optim.epochs": integer(1),
      "optim.decay_epochs": _decay_epochs_type,
      "optim.decay_factor": number(0, low_open=True),
      "optim.max_steps": integer(0),
      "train.dtype": one_of(tuple(_COMPUTE_DTYPES)),
      "train.log_every": integer(1),
      "train.checkpoint_every": integer(1),
      "train.keep_checkpoints": integer(1),
      "train.eval_every_epochs": integer(0),
      "train.select_on": one_of(("validation", "test")),
      "train.center_shots": integer(1),
      "train.center_images_per_group": integer(1),
      "train.max_similarities": integer(1),
      "train.precomputed_refs": boolean,
      "train.compilation_cache": text,
      "eval.format": one_of(readers),
      "eval.root": text,
      "eval.classes": text,
      "eval.methods": sequence_of(tuple(sorted(METHODS)), lower=True),
      "eval.features": sequence_of(FEATURE_KINDS),
      "eval.shots": integer(1),
      "eval.k_shot": integer(0),
      "eval.noisy_share": number(0, 1, high_open=True),
      "eval.masks_optional": boolean,
      "eval.checkpoint": one_of(("auto", "angle", "norm")),
      "eval.resize": integer(0),
      "eval.class_resize": _resize_table,
      "eval.aligned_references": text,
      "eval.best_over_test": boolean,
      "eval.batch_size": integer(1),
      "eval.tsne": boolean,
      "eval.method_settings": _mapping,
      # 0 is fine with --val (nothing is held out); without it adjax fit asks for (0, 1).
      "detect.holdout_share": number(0, 1, high_open=True),
      "detect.target_fpr": number(0, 1, low_open=True, high_open=True),
      "detect.pixel_fpr": number(0, 1, low_open=True, high_open=True),
      "detect.threshold": one_of(RULES),
      # The demo's group (adjax/configs/demo.py), only in its config.
      "demo.data_dir": text,
      "demo.workdir": text,
      "demo.pretrain_classes": integer(1),
      "demo.eval_classes": integer(1),
      "demo.images_per_class": integer(2),
      "demo.views": integer(1),
      "demo.fresh": boolean,
  }


def _decay_epochs_type(value: Any) -> Optional[str]:
  # Epoch boundaries may be fractional (the schedule multiplies them by the steps per epoch).
  if isinstance(value, (tuple, list)) and all(
      _is_number(v) and math.isfinite(float(v)) for v in value):
    return None
  return "expected a list of finite numbers (epochs; () for none)"


def _lookup(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _shown(value: Any) -> str:
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict())
  return repr(value) if isinstance(value, (tuple, list, Mapping)) else str(value)


def _relations(config: Any, bad: set[str], training: bool) -> list[str]:
  """Problems between settings; a setting whose own value is already bad is left out (its
  problem is reported once, by itself). The schedule's and the losses' relations concern
  training only: evaluating a finished run must not fail on how it was trained."""
  problems: list[str] = []

  def value(key: str) -> Any:
    return _MISSING if key in bad else _lookup(config, key)

  shots, max_shots = value("data.shots"), value("data.max_shots")
  if shots is not _MISSING and max_shots is not _MISSING and max(shots) > max_shots:
    problems.append(f"config.data.max_shots = {max_shots}: expected >= max(config.data.shots) "
                    f"= {max(shots)} (the batch holds at most max_shots references)")
  if not training:
    return problems
  epochs, decay = value("optim.epochs"), value("optim.decay_epochs")
  if decay is not _MISSING and decay:
    steps = [float(v) for v in decay]
    if any(v <= 0 for v in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
      problems.append(f"config.optim.decay_epochs = {_shown(decay)}: expected epochs > 0 in "
                      "strictly ascending order")
    elif epochs is not _MISSING and steps[-1] >= epochs:
      # A boundary at or after the last epoch never lowers the lr of any step.
      problems.append(f"config.optim.decay_epochs = {_shown(decay)}: expected each < "
                      f"config.optim.epochs = {epochs} (a later one never takes effect; set "
                      "--config.optim.decay_epochs to match the epochs, or () for none)")
  if value("loss.angle") is False and value("loss.norm") is False:
    problems.append("config.loss.angle = False and config.loss.norm = False: expected at least "
                    "one loss (else nothing is trained)")
  return problems


def config_problems(config: Any, *, training: bool = True) -> list[str]:
  """Every problem of `config`, one line each naming the setting; [] when it is fine.
  training=False leaves out the relations that only a training run depends on."""
  problems, bad = [], set()
  for key, check in _rules().items():
    value = _lookup(config, key)
    if value is _MISSING:
      continue
    expected = check(value)
    if expected is not None:
      bad.add(key)
      problems.append(f"config.{key} = {_shown(value)}: {expected}")
  return problems + _relations(config, bad, training)


def validate_config(config: ml_collections.ConfigDict, *,
                    training: bool = True) -> ml_collections.ConfigDict:
  """Raises UserError naming every bad setting of `config`; returns `config` when fine.

  Call it where a config is final (after the file and the overrides) and before anything is
  computed or written: the CLI, pretrain, evaluate, the detector's fit, the references, sweeps.
  training=False (evaluation, fitting a detector, importing a projector): the settings a
  finished run was trained with are not judged, only how they relate in a run to come.
  """
  problems = config_problems(config, training=training)
  if len(problems) == 1:
    raise UserError(problems[0])
  if problems:
    raise UserError(f"{len(problems)} bad settings: " + "; ".join(problems))
  return config
