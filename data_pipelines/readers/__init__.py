"""Dataset readers: one module per folder layout, each `read(root, classes, masks_optional=)`
(masks_optional: keep anomalous images without a mask, mask_path None, instead of failing).

`READERS` maps a format name to its reader; `data_pipelines.index` uses it.
"""

from __future__ import annotations

from data_pipelines.readers import btad, folder, mpdd, mvtec, mvtec3d, realiad, visa

READERS = {
    "realiad": realiad.read,
    "mvtec": mvtec.read,
    "visa": visa.read,
    "btad": btad.read,
    "mpdd": mpdd.read,
    "mvtec3d": mvtec3d.read,
    "folder": folder.read,
}
