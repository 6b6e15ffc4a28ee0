"""GLASS's image-space texture anomalies for evaluation: texture photographs blended into a
class's training images, featurised as each feature kind (docs/method.md section 6)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import ml_collections
import numpy as np

from adjax.evaluate.features import FeatureMaker, class_resize, method_settings_for

log = logging.getLogger("adjax.evaluate")


class GlassTextureSets:
  """GLASS's image-space texture anomalies of one class's training images, featurised, set by
  set. With GLASS's input settings (eval.method_settings.glass.*, Glass.input_settings): set s
  is `texture_rounds` R texture-augmented copies of each training image (copy r of image i at
  r * N + i; textures from `textures`, only on the object with `foreground`), seeded by the
  run's seed, the class and s (set 0 by the seed and the class alone), featurised as the real
  images of a feature kind (the class's references, the projector). With `texture_refresh`
  GLASS asks for set s at epoch s R."""

  def __init__(self, config: ml_collections.ConfigDict, maker: FeatureMaker, data: dict,
               class_name: str, train_levels, textures: Sequence[str], method_settings: dict,
               method: str = "glass"):
    import zlib
    from adjax.methods import get_method, method_inputs
    from data_pipelines import texture_anomalies
    ev = config.eval
    self._maker, self._textures, self._images = maker, textures, data["train_images"]
    self._glass = get_method(method, **method_settings_for(method, "original", method_settings))
    self._grid = self._glass.token_grid(train_levels)
    self._resize = class_resize(ev, class_name)
    inputs = method_inputs(method, method_settings.get(method))
    self._rounds = int(inputs["texture_rounds"])
    self._seed = [int(config.seed), zlib.crc32(class_name.encode())]
    # In chunks, keeping only the levels GLASS uses: R x N images of every level and kind at
    # once would take several times the memory of the class's own features.
    self._chunk = max(1, int(ev.get("batch_size", 16))) * 4
    self._foregrounds = None
    if inputs["foreground"]:
      # GLASS's masks are for the class's normal training images; an anomalous image mixed
      # into training (eval.noisy_share) has none, and a class without a folder has none.
      self._foregrounds = [None if noisy else texture_anomalies.read_foreground(
          inputs["foreground"], class_name, path, config.image_size, self._resize)
          for path, noisy in zip(data["train_paths"], data["train_noisy"])]
      if all(f is None for f in self._foregrounds):
        log.info("class %r: no foreground masks under %s; texture anomalies go anywhere",
                 class_name, inputs["foreground"])

  def features(self, set_index: int, kinds: Sequence[str], refs, projector: dict[str, Any]
               ) -> tuple[dict[str, list], np.ndarray]:
    """({kind key: GLASS's levels (the last num_levels)}, (R N, h, w) token masks on its grid)
    of set `set_index`, for every feature kind in `kinds` (one backbone pass)."""
    from data_pipelines import texture_anomalies
    from adjax.methods.common import last_levels
    rng = np.random.default_rng(self._seed + ([set_index] if set_index else []))
    images, masks = texture_anomalies.synthesize(
        self._images, self._textures, self._grid, rng, rounds=self._rounds,
        foregrounds=self._foregrounds, resize=self._resize)
    parts = []   # per chunk: {kind key: GLASS's levels}
    for start in range(0, len(images), self._chunk):
      levels = self._maker.backbone_levels(images[start:start + self._chunk])
      parts.append({key: [np.asarray(lv) for lv in last_levels(kind_levels,
                                                                 self._glass.num_levels)]
                    for key, kind_levels in self._maker.features_of(kinds, levels, refs,
                                                                    projector).items()})
    return {key: [np.concatenate(level) for level in zip(*(part[key] for part in parts))]
            for key in parts[0]}, masks
