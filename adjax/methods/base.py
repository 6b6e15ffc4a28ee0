"""What every downstream detector is: the `Detector` protocol and the facts a method declares.

A method is a frozen dataclass of its settings with `fit` and `score`; what the evaluation loop
needs to know about it beyond that is declared on its class (`MethodFacts`), so the loop asks
the method instead of keeping lists of names.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional, Protocol, Sequence

import jax


class MethodFacts:
  """Class-level facts with their defaults; a method class inherits this and overrides them.

  Attributes:
    checkpoint: the selected pretraining checkpoint the method uses ("angle": the one PatchCore
      selected; "norm": the one FeatureNorm selected), docs/method.md section 6.
    per_dataset: one model fitted on every class of a dataset (UniAD), not one per class.
    residual_settings: settings the reference gives the method on residual features (the
      residual and pretrained kinds), under the user's own.
    aligned_references: takes each test image's own reference images when
      config.eval.aligned_references is set.
    synthetic_inputs: what `fit` can take beyond the training features: "textures" for GLASS's
      image-space texture anomalies; "" for nothing.
    input_settings: settings under `eval.method_settings.<method>` that are not the method's
      own fields but tell the evaluation loop how to make its inputs (GLASS's texture folder),
      with their defaults.
  """

  checkpoint: ClassVar[str] = "norm"
  per_dataset: ClassVar[bool] = False
  residual_settings: ClassVar[Mapping[str, Any]] = {}
  aligned_references: ClassVar[bool] = False
  synthetic_inputs: ClassVar[str] = ""
  input_settings: ClassVar[Mapping[str, Any]] = {}


class Detector(Protocol):
  """A downstream anomaly detector on feature levels (list of (N, h_k, w_k, C_k) arrays).

  Methods that train in epochs (CFLOW, GLASS) also have `fit_in_rounds`, which yields the
  state after every `test_every` epochs.
  """

  checkpoint: ClassVar[str]
  per_dataset: ClassVar[bool]
  residual_settings: ClassVar[Mapping[str, Any]]
  aligned_references: ClassVar[bool]
  synthetic_inputs: ClassVar[str]
  input_settings: ClassVar[Mapping[str, Any]]

  def fit(self, train_levels: Optional[Sequence[jax.Array]], rng: jax.Array,
          **extras: Any) -> Any:
    """The fitted state (a pytree) from normal training features."""

  def score(self, state: Any, test_levels: Sequence[jax.Array], image_size: Any
            ) -> tuple[jax.Array, jax.Array]:
    """(image scores (M,), anomaly maps (M, H, W)); higher is more anomalous."""
