"""Detectors fitted once on a folder of normal images and used to score new ones
(docs/detector.md): `Detector.fit`, `save`, `Detector.load`, `predict`."""

from adjax.detector.model import Detector

__all__ = ["Detector"]
