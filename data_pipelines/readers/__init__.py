"""Dataset readers: one module per published folder layout, each `read(root, classes)`.

`READERS` maps a format name to its reader; `data_pipelines.index` uses it.
"""

from __future__ import annotations

from data_pipelines.readers import btad, mpdd, mvtec, mvtec3d, realiad, visa

READERS = {
    "realiad": realiad.read,
    "mvtec": mvtec.read,
    "visa": visa.read,
    "btad": btad.read,
    "mpdd": mpdd.read,
    "mvtec3d": mvtec3d.read,
}
