"""Helpers shared by the readers: image listing, class selection and layout errors."""

from __future__ import annotations

import os
from typing import Sequence

from data_pipelines.records import LayoutError

# The formats PIL decodes that datasets come in.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def listing(path: str, limit: int = 8) -> str:
  """A short description of what a folder holds, for error messages."""
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    return f"<unreadable: {e}>"
  if not names:
    return "an empty folder"
  shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(path, n)) else "")
                    for n in names[:limit])
  more = f", ... ({len(names)} entries)" if len(names) > limit else ""
  return f"[{shown}{more}]"


def layout_error(fmt: str, root: str, expected: str, where: str | None = None) -> LayoutError:
  where = where or root
  return LayoutError(
      f"{root!r} does not have the {fmt} layout: expected {expected}; found in {where!r}: "
      f"{listing(where)}")


def is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def images_in(folder: str) -> list[str]:
  """Sorted image file names of a folder (not recursive); [] when the folder is missing."""
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder)
                if is_image(n) and os.path.isfile(os.path.join(folder, n)))


def images_under(folder: str) -> list[str]:
  """Sorted paths of the image files at any depth below a folder (hidden files and folders
  skipped); [] when the folder is missing."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if is_image(n))
  return out


def subdirs(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder)
                if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def choose_classes(fmt: str, root: str, found: Sequence[str],
                   wanted: Sequence[str] | None) -> list[str]:
  """The requested classes, checked against the ones found."""
  if wanted is None:
    return sorted(found)
  if isinstance(wanted, str):
    wanted = [wanted]
  missing = sorted(set(wanted) - set(found))
  if missing:
    raise LayoutError(f"{fmt} classes {missing} not found under {root!r} "
                      f"(found {sorted(found)})")
  return sorted(set(wanted))


def find_by_stem(folder: str, stem: str) -> str | None:
  """The image file in `folder` whose name without extension is `stem`, if any."""
  for ext in IMAGE_EXTS:
    for cand in (stem + ext, stem + ext.upper()):
      p = os.path.join(folder, cand)
      if os.path.isfile(p):
        return p
  return None
