"""The image check before pretraining: every image and mask of the pretraining records is read
and decoded once, before the first step, so that a damaged file stops the run (or is dropped)
at its start and not when the loader first draws it, possibly hours in.

`data.skip_unreadable_share` decides: when the unreadable records are at most that share of
the set they are dropped from the plan (each named in a warning and listed in
`<workdir>/unreadable.json`); above it the run stops with a UserError before training.

The result is kept in `<workdir>/unreadable.json` with a fingerprint of what was checked (the
record list and each file's size and modification time): a resume of the run with the same
files reuses it instead of decoding every file again, and drops the same records, so its plan
(hence its batches) is the one the run started with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import jax
import ml_collections

from adjax import run_layout
from adjax.errors import UserError
from adjax.io import files
from data_pipelines import images as images_lib
from data_pipelines.records import Record

log = logging.getLogger("adjax.train")

CHECK_VERSION = 1     # bumped when what the check accepts changes: older results are redone
_NAMED = 3            # files the error message names
_WARNED = 50          # dropped records named one warning each; the rest only in the file


def _threads() -> int:
  # Reading is often I/O-bound (network file systems), decoding CPU-bound with the GIL
  # released by PIL: at least a few threads, at most one or two per core.
  return min(32, max(4, os.cpu_count() or 1))


def _stamp(path: Optional[str]) -> Optional[list[int]]:
  """[size, mtime_ns] of a file, or None when it is absent (the check then fails it)."""
  if not path:
    return None
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [int(st.st_size), int(st.st_mtime_ns)]


def _pack_stamp(builder_dir: str) -> str:
  """One digest of every file of a packed dataset (its shards and index)."""
  entries = []
  for name in sorted(os.listdir(builder_dir)) if os.path.isdir(builder_dir) else []:
    entries.append([name, _stamp(os.path.join(builder_dir, name))])
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def fingerprint(records: Sequence[Record]) -> str:
  """A digest of the records (in order) and of the size and modification time of each file
  they read: it changes when a record is added, dropped or moved, or a file is rewritten."""
  packs = {r.packed[0] for r in records if r.packed is not None}
  pack_stamps = {d: _pack_stamp(d) for d in sorted(packs)}

  def entry(r: Record) -> str:
    stamps = ([pack_stamps[r.packed[0]]] if r.packed is not None
              else [_stamp(r.image_path), _stamp(r.mask_path)])
    return json.dumps([r.to_json(), stamps], sort_keys=True)

  digest = hashlib.sha256(f"adjax image check {CHECK_VERSION}\n".encode())
  with ThreadPoolExecutor(_threads()) as pool:   # stat calls are slow on network file systems
    for line in pool.map(entry, records):
      digest.update(line.encode() + b"\n")
  return digest.hexdigest()


def _cached(path: str, key: str, count: int) -> Optional[list[dict[str, Any]]]:
  """The unreadable entries of an earlier check of the same files, or None."""
  if not os.path.isfile(path):
    return None
  try:
    data = files.read_json(path)
  except (OSError, ValueError):  # a damaged cache is only a cache: check again
    return None
  if not isinstance(data, dict) or data.get("fingerprint") != key or \
      data.get("checked") != count or not isinstance(data.get("unreadable"), list):
    return None
  return data["unreadable"]


def _scan(records: Sequence[Record], progress: bool) -> list[dict[str, Any]]:
  _, report = images_lib.check_records(
      records, skip_bad=True, max_skip_share=1.0, num_threads=_threads(),
      progress=progress and jax.process_index() == 0, desc="check images")
  return [{"index": int(i), "image": records[i].image_path, "mask": records[i].mask_path,
           "file": failed, "reason": files.one_line(why)}
          for i, failed, (_, why) in zip(report.bad_indices, report.failed_files,
                                         report.skipped)]


def _agree_across_processes(bad: list[int]) -> None:
  """Every process must drop the same records (the plan is the same on every host); a file
  readable on one host and not on another would otherwise make the hosts' plans differ."""
  if jax.process_count() < 2:
    return
  import numpy as np
  from jax.experimental import multihost_utils
  digest = hashlib.sha256(json.dumps(bad).encode()).digest()
  multihost_utils.assert_equal(
      np.array([len(bad), int.from_bytes(digest[:3], "little")], np.int32),
      "the processes found different unreadable pretraining images")


def skip_share_setting(config: ml_collections.ConfigDict) -> float:
  """config.data.skip_unreadable_share, checked to be a share."""
  value = config.data.get("skip_unreadable_share", 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    raise UserError(f"config.data.skip_unreadable_share must be a number in [0, 1], got "
                    f"{value!r}")
  return float(value)


def checked_records(records: Sequence[Record], config: ml_collections.ConfigDict,
                    workdir: str, *, progress: bool = True) -> list[Record]:
  """The pretraining records without the unreadable ones, after checking every file once
  (or reusing the check of the same files in `<workdir>/unreadable.json`).

  Args:
    records: the pretraining index (setup.pretrain_records), the same on every process.
    config: the run config (data.skip_unreadable_share).
    workdir: the run's folder; the check's result is written there by process 0.
    progress: a progress bar for the check (process 0 only).

  Returns:
    the readable records, in their order.

  Raises:
    UserError: more than data.skip_unreadable_share of the records are unreadable.
  """
  allowed = skip_share_setting(config)
  records = list(records)
  path = run_layout.unreadable_path(workdir)
  key = fingerprint(records)
  entries = _cached(path, key, len(records))
  if entries is None:
    entries = _scan(records, progress)
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      files.write_json(path, {"fingerprint": key, "checked": len(records),
                              "share": len(entries) / max(len(records), 1),
                              "unreadable": entries})
  else:
    log.info("image check: %d records checked before (%s), %d unreadable", len(records),
             path, len(entries))
  bad = sorted(int(e["index"]) for e in entries)
  _agree_across_processes(bad)
  share = len(bad) / max(len(records), 1)
  if share > allowed:
    first = "; ".join(f"{e['file']} ({e['reason']})" for e in entries[:_NAMED])
    raise UserError(
        f"{len(bad)} of {len(records)} pretraining images are unreadable ({share:.2%} > "
        f"config.data.skip_unreadable_share={allowed:g}); first: {first}; all are listed in "
        f"{path}. Repair or remove them, or set config.data.skip_unreadable_share to at least "
        f"{share:.4g} to train without them")
  for e in entries[:_WARNED]:
    log.warning("dropped unreadable pretraining image %s: %s", e["file"], e["reason"])
  if len(entries) > _WARNED:
    log.warning("dropped %d more unreadable pretraining images, listed in %s",
                len(entries) - _WARNED, path)
  if bad:
    log.warning("pretraining on %d of %d records: %d unreadable (%.2f%%, within "
                "config.data.skip_unreadable_share=%g) dropped; the list is in %s",
                len(records) - len(bad), len(records), len(bad), 100 * share, allowed, path)
  dropped = set(bad)
  return [r for i, r in enumerate(records) if i not in dropped]
