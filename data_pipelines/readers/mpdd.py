"""MPDD reader: the MVTec AD layout (`<class>/train/good`, `test/<type>`,
`ground_truth/<type>/<stem>_mask.png`)."""

from __future__ import annotations

from typing import Sequence

from data_pipelines.readers.mvtec import read_mvtec_like
from data_pipelines.records import Record


def read(root: str, classes: Sequence[str] | None = None,
         masks_optional: bool = False) -> list[Record]:
  """MPDD records (see `read_mvtec_like`)."""
  return read_mvtec_like("mpdd", root, classes, masks_optional)
