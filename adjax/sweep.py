"""Sweeps: run a list of config overrides one point after another, or emit launch commands.

A sweep is a plain function in an experiment file that returns `[(name, overrides), ...]`, e.g.
`experiments/ablations.py:loss_sweep`. The base config is the file's `get_config(arg)` (or
another `--config FILE[:ARG]`); each point applies its overrides, then the command line's
`--config.*` overrides, and runs in its own workdir `<sweep_dir>/<name>`:

- the job is the experiment file's `run(config, workdir) -> dict | None` when it defines one,
  else pretraining followed by evaluation (`adjax.pretrain.pretrain`, `adjax.evaluate.evaluate`);
- `<point>/results.json` records the point: status (done / failed), overrides, seconds, the
  job's results (its return value, or the results.json it wrote) or the error;
- `<point>/DONE` is written last when the point succeeded; a rerun skips such points and
  retries the failed ones; a failed point (its traceback in `<point>/error.log`) does not stop
  the others.

`emit_commands` writes one `adjax sweep ... --only NAME` command per point for a cluster
scheduler (each runs one point through this same code). `collect` gathers every point's
results.json into results.md, results.csv and results.png.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

from adjax.io import files
from adjax.configs import loading as config_loading
from adjax.configs.validation import validate_config
from adjax import run_layout
from adjax.errors import Preempted, UserError

SWEEP_FILE = "sweep.json"
ERROR_FILE = "error.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,-]*$")


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of a sweep: its workdir name and its config overrides."""
  name: str
  overrides: dict[str, Any]


# ----------------------------------------------------------------------------- loading
def parse_sweep_spec(spec: str, sweep: str | None = None) -> tuple[str, str]:
  """`FILE:FUNC` (or FILE with `sweep=FUNC`) -> (FILE, FUNC).

  Raises:
    UserError: no function named, or both forms disagree.
  """
  path, func = config_loading.parse_config_spec(spec)
  if func and sweep and func != sweep:
    raise UserError(f"sweep named twice: {spec!r} and --sweep {sweep}")
  func = func or sweep
  if not func:
    raise UserError(f"name the sweep function: {path}:NAME or --sweep NAME")
  return path, func


def sweep_functions(module: Any) -> list[str]:
  """Names of the module's sweep functions (public callables whose name ends in `_sweep`)."""
  return sorted(name for name in dir(module)
                if name.endswith("sweep") and not name.startswith("_")
                and callable(getattr(module, name)))


def load_points(path: str, func: str) -> tuple[Any, list[Point]]:
  """Imports the sweep file and calls its sweep function.

  Returns:
    (the module, the points).

  Raises:
    UserError: no such function, or points with bad or duplicate names or bad overrides.
  """
  module = config_loading.load_module(path)
  fn = getattr(module, func, None)
  if not callable(fn):
    raise UserError(f"{path} has no sweep function {func!r}; it has: "
                    f"{', '.join(sweep_functions(module)) or 'none'}")
  points = []
  for item in fn():
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
      raise UserError(f"{path}:{func} must return (name, overrides dict) pairs, got {item!r:.100}")
    name, overrides = item
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
      raise UserError(f"{path}:{func}: point name {name!r} is not a safe folder name "
                      "(letters, digits and . _ = + , -)")
    points.append(Point(name, dict(overrides)))
  names = [p.name for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"{path}:{func}: duplicate point names {duplicates}")
  if not points:
    raise UserError(f"{path}:{func} returned no points")
  return module, points


def point_config(config_spec: str, point: Point,
                 cli_overrides: Sequence[tuple[str, str]] = ()):
  """The config of one point: the base config, the point's overrides, then the CLI's."""
  config = config_loading.load_config(config_spec)
  try:
    config_loading.apply_overrides(config, point.overrides)
  except ValueError as err:
    raise UserError(f"sweep point {point.name!r}: {err}") from err
  config_loading.apply_overrides(config, cli_overrides)
  try:   # every point is built before any runs or the sweep's folder is written
    return validate_config(config)
  except UserError as err:
    raise UserError(f"sweep point {point.name!r}: {err}") from err


def _base_spec(path: str, config_spec: str | None) -> str:
  """`--config` defaults to the sweep file; `:ARG` means the sweep file with ARG."""
  if not config_spec:
    return path
  if config_spec.startswith(":"):
    return path + config_spec
  return config_spec


def is_done(point_dir: str) -> bool:
  return os.path.isfile(run_layout.done_path(point_dir))


# ----------------------------------------------------------------------------- running
def default_run(config: Any, workdir: str) -> dict[str, Any] | None:
  """Pretrain, then evaluate into `<workdir>/eval`; returns the evaluation's results."""
  from adjax.evaluate import evaluate
  from adjax.evaluate.selection import selection_evaluator
  from adjax.pretrain import pretrain
  summary = pretrain(config, workdir, make_evaluator=selection_evaluator)
  if summary["preempted"]:  # not finished: no evaluation, no DONE; a rerun resumes it
    raise Preempted(f"preempted at step {summary['steps']} of {summary['total_steps']}")
  out_dir = os.path.join(workdir, "eval")
  results = evaluate(config, workdir, out_dir)
  if results is None and os.path.isfile(os.path.join(out_dir, run_layout.RESULTS_FILE)):
    results = files.read_json(os.path.join(out_dir, run_layout.RESULTS_FILE))
  return results


def _plan(path: str, points: Sequence[Point], sweep_dir: str, func: str,
          config_spec: str) -> None:
  # Every job of an emitted sweep writes the same content: a race between them is harmless.
  files.write_json(os.path.join(sweep_dir, SWEEP_FILE), {
      "sweep": f"{os.path.abspath(path)}:{func}", "config": config_spec,
      "points": [{"name": p.name, "overrides": p.overrides} for p in points]})


def run_sweep(spec: str, sweep_dir: str, *, sweep: str | None = None,
              config_spec: str | None = None,
              cli_overrides: Sequence[tuple[str, str]] = (),
              only: Iterable[str] | None = None,
              run_fn: Callable[[Any, str], Any] | None = None,
              log: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs the points of a sweep one after another.

  Args:
    spec: `FILE:FUNC` or FILE (with `sweep`).
    sweep_dir: the sweep's folder; point i runs in `<sweep_dir>/<name_i>`.
    sweep: the sweep function's name when `spec` has none.
    config_spec: base config `FILE[:ARG]` (or `:ARG` for the sweep file with ARG); default the
      sweep file's `get_config()`.
    cli_overrides: `(key, text)` overrides applied to every point after its own.
    only: run only these point names.
    run_fn: the job `(config, workdir) -> results`; default the file's `run`, else
      `default_run`.
    log: progress lines go here.

  Returns:
    {"done": [...], "skipped": [...], "failed": [...], "preempted": [...]} point names (a
    preempted point, one at most, stops the sweep; a job other than `default_run` signals
    preemption by raising adjax.errors.Preempted).

  Raises:
    UserError: a bad spec, an unknown point in `only`, or a point whose overrides do not fit
      the config (checked for every point before any runs).
  """
  path, func = parse_sweep_spec(spec, sweep)
  module, points = load_points(path, func)
  base = _base_spec(path, config_spec)
  if only is not None:
    only = list(only)
    unknown = [n for n in only if n not in {p.name for p in points}]
    if unknown:
      raise UserError(f"unknown sweep point(s) {unknown}; the points are "
                      f"{', '.join(p.name for p in points)}")
    points_to_run = [p for p in points if p.name in only]
  else:
    points_to_run = points
  configs = {p.name: point_config(base, p, cli_overrides) for p in points_to_run}
  job = run_fn or getattr(module, "run", None) or default_run
  os.makedirs(sweep_dir, exist_ok=True)
  _plan(path, points, sweep_dir, func, base)

  summary: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "preempted": []}
  for i, point in enumerate(points_to_run, 1):
    tag = f"[{i}/{len(points_to_run)}] {point.name}"
    workdir = os.path.join(sweep_dir, point.name)
    if is_done(workdir):
      changes = run_layout.config_changes(workdir, configs[point.name])
      # Kept (a rerun that fixes one failed point must not redo the others), but said: its
      # results come from those settings, not from this command's.
      log(f"{tag}: already done, skipped" + (
          f"; NOTE: it ran with other settings: {'; '.join(changes)} (remove {workdir} to "
          "rerun it with these)" if changes else ""))
      summary["skipped"].append(point.name)
      continue
    status = _run_point(point, configs[point.name], workdir, job, tag, log)
    summary[status].append(point.name)
    if status == "preempted":  # the process was asked to stop: the rest waits for a rerun
      break
  log(f"sweep {os.path.basename(path)}:{func}: {len(summary['done'])} done, "
      f"{len(summary['skipped'])} skipped, {len(summary['failed'])} failed"
      + (f" ({', '.join(summary['failed'])})" if summary["failed"] else "")
      + (f", preempted in {summary['preempted'][0]}" if summary["preempted"] else ""))
  return summary


def _run_point(point: Point, config: Any, workdir: str, job: Callable, tag: str,
               log: Callable[[str], None]) -> str:
  """Runs one point: "done", "failed" (recorded, the sweep goes on) or "preempted" (the job
  raised Preempted: recorded without DONE, so that a rerun resumes the point)."""
  os.makedirs(workdir, exist_ok=True)
  results_file = run_layout.results_path(workdir)
  for stale in (results_file, os.path.join(workdir, ERROR_FILE)):
    if os.path.exists(stale):  # a failed attempt's record; the job may write its own
      os.remove(stale)
  if not (run_layout.has_checkpoint(workdir) and run_layout.config_changes(workdir, config)):
    # Else the point's checkpoints came from other settings: config.json keeps those, and the
    # pretraining refuses to resume them under these (a failed point, naming the differences).
    run_layout.save_config(workdir, config)
  record = {"point": point.name, "overrides": point.overrides}
  log(f"{tag}: running in {workdir}")
  start = time.time()
  try:
    results = job(config, workdir)
    if results is None and os.path.isfile(results_file):
      results = files.read_json(results_file)
  except Preempted as err:
    seconds = round(time.time() - start, 3)
    files.write_json(results_file, {**record, "status": "preempted", "seconds": seconds,
                                         "error": str(err)})
    log(f"{tag}: {err}; run the sweep again to resume it")
    return "preempted"
  except Exception as err:  # a failed point must not stop the sweep; KeyboardInterrupt does
    seconds = round(time.time() - start, 3)
    message = " ".join(f"{type(err).__name__}: {err}".split())
    with open(os.path.join(workdir, ERROR_FILE), "w") as f:
      f.write(traceback.format_exc())
    files.write_json(results_file, {**record, "status": "failed", "seconds": seconds,
                                         "error": message})
    log(f"{tag}: FAILED after {seconds:.1f}s: {message[:300]} (see "
        f"{os.path.join(workdir, ERROR_FILE)})")
    return "failed"
  seconds = round(time.time() - start, 3)
  files.write_json(results_file, {**record, "status": "done", "seconds": seconds,
                                       "results": results if results is not None else {}})
  files.atomic_write(run_layout.done_path(workdir),
                          lambda f: f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n"),
                          binary=False)
  log(f"{tag}: done in {seconds:.1f}s")
  return "done"


# ----------------------------------------------------------------------------- emitting
def emit_commands(spec: str, sweep_dir: str, *, sweep: str | None = None,
                  config_spec: str | None = None,
                  cli_overrides: Sequence[tuple[str, str]] = (),
                  program: str = "adjax") -> list[str]:
  """One shell command per point, each running that point alone (`--only NAME`).

  The points' configs are built (and so checked) first; paths are made absolute so that the
  commands run from any folder.

  Returns:
    The commands, in the sweep's order.
  """
  path, func = parse_sweep_spec(spec, sweep)
  _, points = load_points(path, func)
  base = _base_spec(path, config_spec)
  for point in points:
    point_config(base, point, cli_overrides)
  os.makedirs(sweep_dir, exist_ok=True)
  _plan(path, points, sweep_dir, func, base)
  base_path, base_arg = config_loading.parse_config_spec(base)
  base_abs = os.path.abspath(base_path) + (f":{base_arg}" if base_arg is not None else "")
  commands = []
  for point in points:
    argv = [program, "sweep", f"{os.path.abspath(path)}:{func}",
            "--workdir", os.path.abspath(sweep_dir), "--only", point.name, "--config", base_abs]
    argv += [f"{config_loading.OVERRIDE_PREFIX}{k}={v}" for k, v in cli_overrides]
    commands.append(" ".join(shlex.quote(a) for a in argv))
  return commands
