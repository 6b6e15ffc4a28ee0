"""The `adjax` command: one entry point with a subcommand for every job.

  adjax demo      [--workdir DIR] [--out DIR] [--config.key=value ...]
  adjax data      embedded --out DIR [...] | pack --format F --root DIR --out DIR [...]
  adjax refs      --config FILE[:ARG] --workdir RUN [--config.key=value ...]
  adjax centers   --config FILE[:ARG] --workdir RUN [...]
  adjax pretrain  --config FILE[:ARG] --workdir RUN [...]
  adjax evaluate  [--config FILE[:ARG]] [--workdir RUN] [--out DIR] [...]
  adjax fit       --method NAME --train DIR --out DETECTOR [--features K] [--workdir RUN] [...]
  adjax predict   --detector DETECTOR --out DIR INPUT [INPUT ...]
  adjax export    --workdir RUN --out FILE.pth|FILE.safetensors [--which angle|norm|latest]
  adjax import    FILE --backbone NAME --out RUN [--which angle|norm|both]
  adjax sweep     FILE:SWEEP --workdir DIR [--config FILE[:ARG]|:ARG] [--only A,B] [--emit FILE|-]
  adjax collect   DIR [--out DIR] [--metric NAME ...]
  adjax bench     NAME [ARGS ...]

The flags mean the same everywhere: `--config FILE[:ARG]` an experiment file and its argument
(`get_config(ARG)`; without it, a run's own config.json, else the default config), `--workdir`
a run's folder, `--out` where the output goes, `--config.path.to.key=value` an override.

A user error (a bad flag, a missing file, a bad override, bad input the library rejects, an OS
error such as a full disk or an --out that is a file or read-only, a folder another process
holds the lock of) is one line on stderr and exit status 2; set ADJAX_DEBUG=1 to see the
traceback instead. The jobs are imported only when their subcommand runs, so `--help` is quick
and one missing piece does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from typing import Sequence

from adjax.cli_output import print_json, user_error_message
from adjax.io import files
from adjax.configs import loading as config_loading
from adjax.configs.validation import validate_config
from adjax.errors import PREEMPTED_EXIT_STATUS, UserError
from adjax.terminal_log import library_messages_on_stderr

PROG = "adjax"
COMMANDS = ("demo", "data", "refs", "centers", "pretrain", "evaluate", "fit", "predict",
            "export", "import", "sweep", "collect", "bench")
# Subcommands that read a config and accept --config.key=value overrides.
_TAKES_OVERRIDES = {"demo", "refs", "centers", "pretrain", "evaluate", "fit", "import", "sweep"}
_CONFIG_HELP = ("experiment config FILE[:ARG] (its get_config(ARG)); default: the run's "
                "config.json if the workdir has one, else adjax.configs.default_config()")
_OVERRIDE_EPILOG = ("Override any config field with --config.path.to.key=value (e.g. "
                    "--config.optim.lr=3e-4 --config.loss.center=false --config.data.shots=1,4,8)"
                    "; the value takes the field's type.")


class _ArgumentError(UserError):
  """argparse's complaint about the command line, with the (sub)command it concerns."""

  def __init__(self, prog: str, message: str):
    super().__init__(f"{message} (see '{prog} --help')")
    self.prog = prog


class _Parser(argparse.ArgumentParser):
  """Raises instead of printing usage and exiting, so that main prints one line."""

  def error(self, message: str):
    raise _ArgumentError(self.prog, message)


# ----------------------------------------------------------------------------- configs
def _resolve_config(args: argparse.Namespace, overrides: Sequence[tuple[str, str]], *,
                    training: bool = True):
  """--config FILE[:ARG], else <workdir>/config.json, else the default; then the overrides;
  then the checks (training: see adjax.configs.validation.validate_config)."""
  from adjax import run_layout
  workdir = getattr(args, "workdir", None)
  if args.config:
    config = config_loading.load_config(args.config)
  elif workdir and os.path.isfile(run_layout.config_path(workdir)):
    config = run_layout.load_config(workdir)
  else:
    config = config_loading.load_config(None)
  config_loading.apply_overrides(config, overrides)
  # Every bad setting in one line (exit 2) before the job reads data or writes a file.
  return validate_config(config, training=training)


# ----------------------------------------------------------------------------- handlers
def _cmd_demo(args, overrides) -> int:
  from adjax.demo import run_demo
  argv_overrides = dict(overrides)
  if args.workdir:
    argv_overrides["workdir"] = args.workdir
  if args.out:
    argv_overrides["out"] = args.out
  print_json(run_demo(argv_overrides))
  return 0


def _cmd_data(args, overrides) -> int:
  del overrides
  if args.data_command == "embedded":
    from data_pipelines.embedded import generate_embedded_dataset
    summary = generate_embedded_dataset(
        args.out, image_size=args.image_size, pretrain_classes=args.pretrain_classes,
        eval_classes=args.eval_classes, images_per_class=args.images_per_class,
        n_views=args.views, seed=args.seed, force=args.force)
    print_json({k: summary[k] for k in ("pretrain_root", "eval_root", "generated", "seconds")
                 if k in summary})
    return 0
  from data_pipelines.tfds_builders import pack_dataset, pack_summary
  classes = [c for c in args.classes.split(",") if c] if args.classes else None
  builder_dir = pack_dataset(args.format, args.root, args.out, classes=classes,
                             skip_bad=args.skip_bad, verify=not args.no_verify)
  summary = pack_summary(builder_dir)
  print_json({"builder_dir": builder_dir, "records": summary.get("records"),
               "skipped": len(summary.get("skipped", [])),
               "hint": "set --config.data.pretrain_tfds_dir to it"})
  return 0


def _job(module: str, name: str, *, selects_checkpoints: bool = False):
  def handler(args, overrides) -> int:
    config = _resolve_config(args, overrides)  # bad overrides first: they are the user's
    fn = getattr(importlib.import_module(module), name)
    if selects_checkpoints:  # pretraining selects its checkpoints with the evaluation's help
      from adjax.evaluate.selection import selection_evaluator
      summary = fn(config, args.workdir, make_evaluator=selection_evaluator)
    else:
      summary = fn(config, args.workdir)
    print_json(summary)
    if isinstance(summary, dict) and summary.get("preempted"):
      # Saved and stopped on SIGTERM: not finished, so not status 0.
      print(f"{PROG} {args.command}: preempted at step {summary.get('steps')} of "
            f"{summary.get('total_steps')}; run the same command again to resume",
            file=sys.stderr)
      return PREEMPTED_EXIT_STATUS
    return 0
  return handler


def _cmd_evaluate(args, overrides) -> int:
  if args.workdir is None:
    # The backbone's own features (original, residual) need no run, but a folder for results.
    if not args.out:
      raise UserError("evaluate: pass --workdir RUN (results go to RUN/eval) or, for original "
                      "and residual features only, --out DIR")
  elif not os.path.isdir(args.workdir):
    raise UserError(f"--workdir {args.workdir}: no such run folder")
  config = _resolve_config(args, overrides, training=False)
  from adjax.evaluate import evaluate
  from adjax.evaluate.reporting import summary_text
  out_dir = args.out or os.path.join(args.workdir, "eval")
  summary = evaluate(config, args.workdir, out_dir)
  # The whole summary is in results.json; the terminal gets the table people read.
  print(summary_text(summary), flush=True)
  print(f"results: {os.path.join(out_dir, 'results.json')}", flush=True)
  return 0


def _cmd_fit(args, overrides) -> int:
  from adjax.detector.commands import run_fit
  print_json(run_fit(args, _resolve_config(args, overrides, training=False)))
  return 0


def _cmd_predict(args, overrides) -> int:
  from adjax.detector.commands import run_predict
  print_json(run_predict(args))
  return 0


def _cmd_export(args, overrides) -> int:
  del overrides
  from adjax import interop
  summary = interop.export_projector(args.workdir, args.out, which=args.which,
                                     use_torch=False if args.no_torch else None)
  print_json(summary)
  return 0


def _cmd_import(args, overrides) -> int:
  from adjax import interop
  config = config_loading.load_config(args.config)
  summary = interop.import_projector(args.file, args.out, backbone=args.backbone,
                                     which=args.which, config=config, overrides=overrides)
  print_json(summary)
  return 0


def _cmd_sweep(args, overrides) -> int:
  from adjax import sweep
  if args.emit:
    commands = sweep.emit_commands(args.spec, args.workdir, sweep=args.sweep,
                                   config_spec=args.config, cli_overrides=overrides)
    text = "\n".join(commands) + "\n"
    if args.emit == "-":
      sys.stdout.write(text)
    else:
      files.atomic_write(args.emit, lambda f: f.write(text), binary=False)
      print(f"wrote {len(commands)} commands to {args.emit}", file=sys.stderr)
    return 0
  only = [n for n in args.only.split(",") if n] if args.only else None
  summary = sweep.run_sweep(args.spec, args.workdir, sweep=args.sweep, config_spec=args.config,
                            cli_overrides=overrides, only=only,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
  print_json(summary)
  if summary.get("preempted"):
    return PREEMPTED_EXIT_STATUS
  return 1 if summary["failed"] else 0


def _cmd_collect(args, overrides) -> int:
  del overrides
  from adjax import sweep_results
  metrics = [m for item in args.metric or [] for m in item.split(",") if m]
  summary = sweep_results.collect(args.dir, out_dir=args.out, metrics=metrics or None)
  print_json({k: summary[k] for k in ("rows", "markdown", "csv", "plot")})
  return 0


def _benchmarks_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _cmd_bench(args, overrides) -> int:
  del overrides
  folder = _benchmarks_dir()
  names = sorted(f[:-3] for f in os.listdir(folder)
                 if f.endswith(".py") and not f.startswith("_")) if os.path.isdir(folder) else []
  if not args.name:
    print("\n".join(names) if names else f"no benchmarks in {folder}")
    return 0
  script = args.name if args.name.endswith(".py") else os.path.join(folder, args.name + ".py")
  if not os.path.isfile(script):
    raise UserError(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}")
  return subprocess.call([sys.executable, script, *args.args])


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of the `adjax` command (without the --config.* overrides)."""
  parser = _Parser(prog=PROG, allow_abbrev=False,
                   description="ADPretrain in JAX: anomaly representation pretraining for "
                               "industrial defect detection.",
                   epilog="Run 'adjax COMMAND --help' for a command's flags.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  sub.required = True

  def add(name: str, help_text: str, handler, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                       **kwargs)
    p.set_defaults(handler=handler)
    return p

  def config_flag(p, help_text=_CONFIG_HELP):
    p.add_argument("--config", metavar="FILE[:ARG]", default=None, help=help_text)

  p = add("demo", "Generate the embedded dataset, pretrain a small projector and evaluate it, "
          "in minutes on a CPU.", _cmd_demo, epilog=_OVERRIDE_EPILOG)
  p.add_argument("--workdir", metavar="DIR", help="run folder (default: the demo's own)")
  p.add_argument("--out", metavar="DIR", help="where the demo's report goes")

  p = add("data", "Make datasets: the embedded demo dataset, or packed ArrayRecord shards.",
          _cmd_data)
  data_sub = p.add_subparsers(dest="data_command", metavar="WHAT", parser_class=_Parser)
  data_sub.required = True
  e = data_sub.add_parser("embedded", help="generate the embedded dataset (real photographs "
                          "from scikit-image with synthetic defects)", allow_abbrev=False)
  e.add_argument("--out", metavar="DIR", required=True, help="output folder")
  e.add_argument("--image-size", type=int, default=224)
  e.add_argument("--pretrain-classes", type=int, default=6)
  e.add_argument("--eval-classes", type=int, default=4)
  e.add_argument("--images-per-class", type=int, default=32)
  e.add_argument("--views", type=int, default=2)
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--force", action="store_true", help="regenerate even if a copy exists")
  k = data_sub.add_parser("pack", help="pack a dataset folder into TFDS ArrayRecord shards",
                          allow_abbrev=False)
  k.add_argument("--format", required=True,
                 help="dataset layout: realiad, mvtec, visa, btad, mpdd, mvtec3d, folder")
  k.add_argument("--root", metavar="DIR", required=True, help="the dataset folder")
  k.add_argument("--out", metavar="DIR", required=True, help="TFDS data dir to write into")
  k.add_argument("--classes", default="", help="comma-separated classes (default: all)")
  k.add_argument("--skip-bad", action="store_true", help="skip unreadable images (capped)")
  k.add_argument("--no-verify", action="store_true", help="do not decode every image once")

  for name, fn, text in (
      ("refs", "precompute_references",
       "Precompute the reference (normal) features of every class and view."),
      ("centers", "compute_centers", "Compute the per-level centres c_k of the angle loss."),
      ("pretrain", "pretrain", "Pretrain the projector (resumes from the workdir's checkpoints).")):
    p = add(name, text, _job("adjax.pretrain", fn, selects_checkpoints=name == "pretrain"),
            epilog=_OVERRIDE_EPILOG)
    config_flag(p)
    p.add_argument("--workdir", metavar="DIR", required=True, help="run folder")

  p = add("evaluate", "Evaluate downstream methods on original and pretrained features.",
          _cmd_evaluate, epilog=_OVERRIDE_EPILOG)
  config_flag(p)
  p.add_argument("--workdir", metavar="DIR",
                 help="run folder (a pretraining run or an imported checkpoint); not needed "
                 "for original and residual features only (then give --out)")
  p.add_argument("--out", metavar="DIR", help="results folder (default: WORKDIR/eval)")

  from adjax.detector.commands import add_fit_arguments, add_predict_arguments
  p = add("fit", "Fit a detector on a folder of normal images and set its thresholds.",
          _cmd_fit, epilog=_OVERRIDE_EPILOG)
  config_flag(p)
  add_fit_arguments(p)
  add_predict_arguments(add("predict", "Score images with a detector: predictions.csv, "
                            "summary.json, heat maps and masks.", _cmd_predict))

  p = add("export", "Export a run's projector as the reference's {'projectors': state_dict} "
          "(.pth) or as .safetensors with metadata.", _cmd_export)
  p.add_argument("--workdir", metavar="DIR", required=True, help="run folder")
  p.add_argument("--out", metavar="FILE", required=True, help="FILE.pth or FILE.safetensors")
  p.add_argument("--which", choices=("angle", "norm", "latest"), default="angle",
                 help="the PatchCore-selected (angle), FeatureNorm-selected (norm) or newest "
                      "(latest) checkpoint (default: angle)")
  p.add_argument("--no-torch", action="store_true",
                 help="write .pth with adjax's own writer even when torch is installed")

  p = add("import", "Make an adjax run from a projector checkpoint (e.g. the released "
          "checkpoints_pro_angle.pth).", _cmd_import, epilog=_OVERRIDE_EPILOG)
  p.add_argument("file", metavar="FILE", help=".pth, .safetensors or .npz projector weights")
  p.add_argument("--backbone", metavar="NAME",
                 help="backbone the projector was trained on (e.g. dinov2-base); required "
                      "unless the file's metadata names it")
  p.add_argument("--out", metavar="DIR", required=True, help="run folder to write")
  p.add_argument("--which", choices=("angle", "norm", "both"), default=None,
                 help="which selected checkpoint this is (default: from the file name, "
                      "*_angle* or *_norm*)")
  config_flag(p, "base config FILE[:ARG] for the run (default: the default config)")

  p = add("sweep", "Run a sweep's points one after another (each in WORKDIR/<point>), or "
          "--emit one launch command per point.", _cmd_sweep, epilog=_OVERRIDE_EPILOG)
  p.add_argument("spec", metavar="FILE[:SWEEP]",
                 help="experiment file and sweep function, e.g. experiments/ablations.py:"
                      "loss_sweep")
  p.add_argument("--sweep", metavar="NAME", help="sweep function (instead of FILE:SWEEP)")
  p.add_argument("--workdir", metavar="DIR", required=True, help="sweep folder")
  config_flag(p, "base config FILE[:ARG], or :ARG for the sweep file's get_config(ARG) "
              "(default: the sweep file's get_config())")
  p.add_argument("--only", metavar="NAMES", help="comma-separated points to run")
  p.add_argument("--emit", metavar="FILE",
                 help="write one command per point to FILE ('-': stdout) instead of running")

  p = add("collect", "Gather a sweep's results into one table (Markdown, CSV) and one plot.",
          _cmd_collect)
  p.add_argument("dir", metavar="DIR", help="sweep folder")
  p.add_argument("--out", metavar="DIR", help="output folder (default: DIR)")
  p.add_argument("--metric", action="append", metavar="NAME",
                 help="metric column(s) to plot (repeatable or comma-separated)")

  p = add("bench", "Run benchmarks/NAME.py with the remaining arguments (no NAME: list them).",
          _cmd_bench)
  p.add_argument("name", nargs="?", metavar="NAME", help="benchmark name")
  p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
  return parser


def _version() -> str:
  try:
    from importlib.metadata import version
    return version("adjax")
  except Exception:  # not installed: running from a checkout
    return "0.1.0"


def _command_of(argv: Sequence[str]) -> str | None:
  for arg in argv:
    if not arg.startswith("-"):
      return arg
  return None


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the `adjax` command.

  Args:
    argv: the arguments after the program name (default sys.argv[1:]).

  Returns:
    The exit status: 0 success, 1 a sweep with failed points (or a benchmark's own status),
    2 a user error (printed as one line on stderr), 130 interrupted, 143 preempted (a
    pretraining run, or a sweep's point, saved and stopped on SIGTERM).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  with library_messages_on_stderr():
    return _run(argv)


def _run(argv: list[str]) -> int:
  command = _command_of(argv)
  prefix = f"{PROG} {command}" if command in COMMANDS else PROG
  try:
    if command == "bench":  # its arguments belong to the benchmark
      rest, overrides = argv, []
    else:
      rest, overrides = config_loading.split_overrides(argv)
    args = build_parser().parse_args(rest)
    if overrides and args.command not in _TAKES_OVERRIDES:
      raise UserError(f"'adjax {args.command}' takes no --config.* overrides (got "
                      f"--config.{overrides[0][0]})")
    return int(args.handler(args, overrides) or 0)
  except SystemExit as exit_:  # --help and --version
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else 2)
  except (ValueError, OSError) as err:  # UserError is a ValueError
    message = user_error_message(err)
    if message is None or os.environ.get("ADJAX_DEBUG"):
      raise  # an unexpected OSError (a bug, or something to report) keeps its traceback
    if isinstance(err, _ArgumentError):
      prefix = err.prog
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prefix}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
