"""The `adjax` command (adjax/cli.py): help, dispatch, and one-line user errors with exit 2.

Run in-process through `main(argv)`; the jobs written elsewhere (train, evaluate, demo, data)
are replaced by recording fakes in sys.modules, so these tests check the command line only.
One test runs the installed console script.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from adjax import cli, run_layout
from adjax.cli import main
# The real tables module, which `adjax evaluate` prints with, stays importable while the tests
# replace the package `adjax.evaluate` by fakes.
import adjax.evaluate.reporting  # noqa: F401
from run_helpers import one_error_line

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "experiments" / "pretrain.py")


def _fake_module(monkeypatch, name: str, **functions) -> list:
  """Installs a module `name` whose functions record their arguments in the returned list."""
  calls: list = []
  module = types.ModuleType(name)
  for fn_name, result in functions.items():
    def fn(*args, _name=fn_name, _result=result, **kwargs):
      calls.append((_name, args, kwargs))
      if isinstance(_result, Exception):
        raise _result
      return _result
    setattr(module, fn_name, fn)
  monkeypatch.setitem(sys.modules, name, module)
  return calls


@pytest.mark.parametrize("argv", [[]] + [[c] for c in cli.COMMANDS] +
                         [["data", "embedded"], ["data", "pack"]])
def test_help_of_every_subcommand(argv, capsys):
  assert main(argv + ["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: " + " ".join(["adjax"] + argv))
  # The shared flags have the same names everywhere they apply.
  if argv and argv[0] in ("refs", "centers", "pretrain", "evaluate", "sweep", "import"):
    assert "--config FILE[:ARG]" in out
  if argv and argv[0] in ("refs", "centers", "pretrain", "evaluate", "export", "sweep"):
    assert "--workdir DIR" in out


def test_unknown_command_and_missing_flag_are_one_line(capsys):
  assert main(["frobnicate"]) == 2
  assert "invalid choice: 'frobnicate'" in one_error_line(capsys)
  assert main(["export", "--out", "x.pth"]) == 2
  line = one_error_line(capsys)
  assert line.startswith("adjax export: error:") and "--workdir" in line
  assert main([]) == 2
  one_error_line(capsys)


@pytest.mark.parametrize("override,expected", [
    ("--config.optim.lrr=3", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("--config.optim.lr=fast", "expected a number"),
    ("--config.loss.center=maybe", "expected a boolean"),
    ("--config.data.batch_size=1.5", "expected an integer"),
    ("--config.nothing=1", "unknown config key 'nothing'"),
])
def test_bad_override_is_one_line_exit_2(override, expected, tmp_path, monkeypatch, capsys):
  calls = _fake_module(monkeypatch, "adjax.pretrain", pretrain=None)
  argv = ["pretrain", "--config", PRETRAIN, "--workdir", str(tmp_path), override]
  assert main(argv) == 2
  line = one_error_line(capsys)
  assert line.startswith("adjax pretrain: error:") and expected in line
  assert not calls  # nothing ran


def test_override_on_a_command_without_config_is_refused(capsys):
  assert main(["collect", "somewhere", "--config.optim.lr=1"]) == 2
  assert "takes no --config.* overrides" in one_error_line(capsys)


def test_pretrain_gets_the_experiment_config_with_overrides(tmp_path, monkeypatch):
  calls = _fake_module(monkeypatch, "adjax.pretrain", pretrain={"steps": 3})
  workdir = str(tmp_path / "run")
  argv = ["pretrain", "--config", PRETRAIN + ":runlocal", "--workdir", workdir,
          "--config.optim.lr=0.5", "--config.data.shots", "1,2,3", "--config.data.max_shots=3",
          "--config.loss.center=no"]
  assert main(argv) == 0
  (name, (config, got_workdir), _), = calls
  assert name == "pretrain" and got_workdir == workdir
  assert config.backbone.name == "efficientnet-lite0"     # from the runlocal variant
  assert config.optim.lr == 0.5 and isinstance(config.optim.lr, float)
  assert config.data.shots == (1, 2, 3)
  assert config.loss.center is False


def test_preempted_pretraining_exits_143(tmp_path, monkeypatch, capsys):
  # Saved and stopped on SIGTERM is not success: a scheduler must run the command again.
  _fake_module(monkeypatch, "adjax.pretrain",
               pretrain={"steps": 3, "total_steps": 9, "preempted": True})
  argv = ["pretrain", "--config", PRETRAIN + ":runlocal", "--workdir", str(tmp_path / "run")]
  assert main(argv) == 143
  assert "preempted at step 3 of 9; run the same command again to resume" in \
      capsys.readouterr().err
  _fake_module(monkeypatch, "adjax.pretrain",
               pretrain={"steps": 9, "total_steps": 9, "preempted": False})
  assert main(argv) == 0


@pytest.mark.parametrize("command,function", [("refs", "precompute_references"),
                                              ("centers", "compute_centers")])
def test_refs_and_centers_dispatch(command, function, tmp_path, monkeypatch):
  calls = _fake_module(monkeypatch, "adjax.pretrain", **{function: None})
  assert main([command, "--workdir", str(tmp_path), "--config.seed=7"]) == 0
  (name, (config, workdir), _), = calls
  assert name == function and workdir == str(tmp_path) and config.seed == 7


def test_evaluate_uses_the_runs_config_json(tmp_path, monkeypatch, capsys):
  from adjax.configs import default_config
  config = default_config()
  config.backbone.name = "clip-large"
  run_layout.save_config(str(tmp_path), config)
  means = {"patchcore": {"original": {"image_auroc": 0.75, "pixel_auroc": 0.5},
                         "pretrained": {"image_auroc": 0.8125, "pixel_auroc": float("nan")}}}
  calls = _fake_module(monkeypatch, "adjax.evaluate",
                       evaluate={"means": means, "classes": ["bottle", "cable"]})
  assert main(["evaluate", "--workdir", str(tmp_path), "--config.eval.shots=4"]) == 0
  (_, (got, workdir, out_dir), _), = calls
  assert got.backbone.name == "clip-large" and got.eval.shots == 4
  assert out_dir == os.path.join(str(tmp_path), "eval")
  # The mean table, as text (the whole summary is in results.json), then where that is.
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "mean over 2 classes (bottle, cable), %:"
  assert [c.strip() for c in lines[2].strip("|").split("|")] == [
      "method", "original image auroc", "pretrained image auroc", "original pixel auroc",
      "pretrained pixel auroc", "original pixel aupro", "pretrained pixel aupro"]
  assert [c.strip() for c in lines[4].strip("|").split("|")] == [
      "patchcore", "75.0", "81.2", "50.0", "-", "-", "-"]
  assert lines[-1] == "results: " + os.path.join(out_dir, "results.json")


def test_evaluate_without_a_run_needs_an_out_folder(tmp_path, monkeypatch, capsys):
  # The backbone's own features (original, residual) need no pretraining run.
  calls = _fake_module(monkeypatch, "adjax.evaluate", evaluate={"image_auroc": 0.5})
  assert main(["evaluate", "--config.eval.features=original,residual"]) == 2
  assert one_error_line(capsys) == (
      "adjax evaluate: error: evaluate: pass --workdir RUN (results go to RUN/eval) or, for "
      "original and residual features only, --out DIR")
  assert main(["evaluate", "--out", str(tmp_path / "out"),
               "--config.eval.features=original,residual"]) == 0
  (_, (config, workdir, out_dir), _), = calls
  assert workdir is None and out_dir == str(tmp_path / "out")
  assert config.eval.features == ("original", "residual")
  assert main(["evaluate", "--workdir", str(tmp_path / "none")]) == 2
  assert "--workdir " + str(tmp_path / "none") + ": no such run folder" in one_error_line(capsys)


def test_library_messages_reach_stderr_once_while_a_command_runs(tmp_path, monkeypatch, capsys):
  """A resumed run's or a continued evaluation's info message is shown (Python drops info by
  default), warnings once; the library's logger is as it was afterwards."""
  import logging
  module = types.ModuleType("adjax.evaluate")

  def evaluate(config, workdir, out_dir):
    logging.getLogger("adjax.evaluate").info("continuing the evaluation in %s", out_dir)
    logging.getLogger("adjax.data").warning("a warning")
    return {}

  module.evaluate = evaluate
  monkeypatch.setitem(sys.modules, "adjax.evaluate", module)
  logger = logging.getLogger("adjax")
  before = (logger.level, logger.propagate, list(logger.handlers))
  assert main(["evaluate", "--out", str(tmp_path)]) == 0
  err = capsys.readouterr().err
  assert err.count(f"adjax.evaluate: continuing the evaluation in {tmp_path}\n") == 1
  assert err.count("adjax.data: warning: a warning\n") == 1
  assert (logger.level, logger.propagate, list(logger.handlers)) == before
  # A command run inside another (a script calling main) prints each message once too.
  inner = types.ModuleType("adjax.evaluate")
  inner.evaluate = evaluate
  calls = []

  def outer(config, workdir, out_dir):
    calls.append(out_dir)
    monkeypatch.setitem(sys.modules, "adjax.evaluate", inner)
    assert main(["evaluate", "--out", str(tmp_path / "inner")]) == 0
    return {}

  module.evaluate = outer
  assert main(["evaluate", "--out", str(tmp_path)]) == 0
  err = capsys.readouterr().err
  assert calls and err.count("continuing the evaluation in") == 1
  assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_library_value_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
  _fake_module(monkeypatch, "adjax.pretrain",
               pretrain=ValueError("data.pretrain_root '' is not a folder\n(set it)"))
  assert main(["pretrain", "--workdir", str(tmp_path)]) == 2
  assert one_error_line(capsys) == ("adjax pretrain: error: data.pretrain_root '' is not a "
                                     "folder (set it)")


def test_demo_and_data_dispatch(tmp_path, monkeypatch):
  demo_calls = _fake_module(monkeypatch, "adjax.demo", run_demo=None)
  assert main(["demo", "--workdir", "w", "--config.optim.max_steps=3"]) == 0
  assert demo_calls == [("run_demo", ({"optim.max_steps": "3", "workdir": "w"},), {})]

  data_calls = _fake_module(monkeypatch, "data_pipelines.embedded",
                            generate_embedded_dataset={"eval_root": "e", "generated": True})
  assert main(["data", "embedded", "--out", str(tmp_path), "--image-size", "64"]) == 0
  (_, (out,), kwargs), = data_calls
  assert out == str(tmp_path) and kwargs["image_size"] == 64

  pack_calls = _fake_module(monkeypatch, "data_pipelines.tfds_builders", pack_dataset="/b",
                            pack_summary={"records": 3, "skipped": [{"file": "x"}]})
  assert main(["data", "pack", "--format", "mvtec", "--root", "r", "--out", "o",
               "--classes", "a,b"]) == 0
  (_, args, kwargs), (_, summary_args, _) = pack_calls
  assert args == ("mvtec", "r", "o") and kwargs["classes"] == ["a", "b"]
  assert summary_args == ("/b",)


def test_bench_runs_the_script_with_the_remaining_args(tmp_path, capsys):
  record = tmp_path / "argv.json"
  script = tmp_path / "toy.py"
  script.write_text("import json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                    "sys.exit(3)\n")
  assert main(["bench", str(script), "--steps", "5", "--config.x=1"]) == 3
  assert json.loads(record.read_text()) == ["--steps", "5", "--config.x=1"]
  assert main(["bench", "no-such-benchmark"]) == 2
  assert "unknown benchmark 'no-such-benchmark'" in one_error_line(capsys)


def test_installed_console_script(tmp_path):
  script = pathlib.Path(sys.executable).parent / "adjax"
  assert script.exists(), "run `pip install --no-deps -e .` to install the adjax command"
  proc = subprocess.run([str(script), "export", "--workdir", str(tmp_path / "none"),
                         "--out", str(tmp_path / "x.pth")],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"adjax export: error: run workdir not found: {tmp_path / 'none'}"]
