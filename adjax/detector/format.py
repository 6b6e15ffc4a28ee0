"""The detector folder's format name and version, and the feature kinds a detector takes."""

FORMAT = "adjax-detector"
FORMAT_VERSION = 1
KINDS = ("original", "residual", "pretrained")
