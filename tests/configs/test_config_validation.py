"""Config validation (adjax/configs/validation.py): every shipped config passes; bad settings
are refused by name before anything is written, from the library and from the command line;
the command line's JSON summaries are strict JSON."""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest

from adjax.cli import main
from adjax.cli_output import print_json
from adjax.configs import default_config
from adjax.configs import loading as config_loading
from adjax.configs.demo import demo_config
from adjax.configs.validation import config_problems, validate_config
from adjax.errors import UserError
from run_helpers import _eval_config, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
BACKBONES = ("dinov2-base", "dinov2-large", "clip-base", "clip-large", "imagebind")
METHODS = ("patchcore", "padim", "featurenorm", "cflow", "uniad", "glass")
DATASETS = ("mvtec", "visa", "btad", "mpdd", "mvtec3d")


def _shipped_configs():
  yield "default", default_config()
  yield "demo", demo_config()
  yield "tiny", tiny_config("/data/pretrain", with_validation=True)
  yield "tiny-eval", _eval_config("/data/pretrain", ("patchcore",), ("original",))
  for backbone in BACKBONES:
    for arg in (f"backbone={backbone}", f"backbone={backbone},runlocal"):
      yield f"pretrain:{arg}", config_loading.load_config(f"{EXPERIMENTS}/pretrain.py:{arg}")
  for method in METHODS:
    for dataset in DATASETS:
      arg = f"method={method},dataset={dataset}"
      yield f"downstream:{arg}", config_loading.load_config(
          f"{EXPERIMENTS}/downstream.py:{arg}")
    arg = f"method={method},runlocal"
    yield f"downstream:{arg}", config_loading.load_config(f"{EXPERIMENTS}/downstream.py:{arg}")
  ablations = config_loading.load_module(str(EXPERIMENTS / "ablations.py"))
  for name, overrides in ablations.all_sweep():
    config = config_loading.apply_overrides(ablations.get_config(), overrides)
    yield f"ablations:{name}", config


def test_every_shipped_config_validates():
  names = []
  for name, config in _shipped_configs():
    assert config_problems(config) == [], name
    assert validate_config(config) is config
    names.append(name)
  assert len(names) > 50   # the experiment files were all found


def _set(config, key: str, value):
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


# (key, bad value, what the message says after "config.KEY = VALUE: ")
BAD_VALUES = [
    ("optim.lr", math.nan, "expected a finite number > 0"),
    ("optim.lr", math.inf, "expected a finite number > 0"),
    ("optim.lr", -1.0, "expected a finite number > 0"),
    ("optim.lr", 0.0, "expected a finite number > 0"),
    ("optim.weight_decay", -1e-4, "expected a finite number >= 0"),
    ("optim.max_steps", -1, "expected an integer >= 0"),
    ("optim.epochs", 0, "expected an integer >= 1"),
    ("optim.decay_factor", math.nan, "expected a finite number > 0"),
    ("projector.depth", 0, "expected an integer >= 1"),
    ("projector.num_ref_tokens", 0, "expected an integer >= 1"),
    ("projector.num_heads", 0, "expected an integer >= 1"),
    ("projector.attention", "flash", "expected one of auto, dense"),
    ("loss.temperature", 0.0, "expected a finite number > 0"),
    ("loss.angle_block_size", 0, "expected an integer >= 1"),
    ("eval.batch_size", 0, "expected an integer >= 1"),
    ("eval.shots", 0, "expected an integer >= 1"),
    ("eval.methods", ("patchcore", "patchkore"), "expected a non-empty list of distinct"),
    ("eval.methods", (), "expected a non-empty list"),
    ("eval.features", ("original", "original"), "distinct names among original"),
    ("eval.checkpoint", "best", "expected one of auto, angle, norm"),
    ("eval.format", "mvtek", "expected one of btad, folder"),
    ("data.pretrain_format", "realiad,nope", "comma-separated"),
    ("data.batch_size", 0, "expected an integer >= 1"),
    ("data.shots", (0, 2), "expected a non-empty list of integers >= 1"),
    ("data.anomaly_share", 1.5, "expected a finite number in [0, 1]"),
    ("data.num_workers", -1, "expected an integer >= 0"),
    ("data.augment_on", "gpu", "expected one of auto, host, device"),
    ("backbone.name", "resnet", "expected one of dinov2-base"),
    ("backbone.taps", (0, 3), "expected a non-empty list of integers >= 1"),
    ("image_size", 0, "expected an integer >= 1"),
    ("seed", -1, "expected an integer >= 0"),
    ("train.dtype", "float16", "expected one of float32, bfloat16"),
    ("train.log_every", 0, "expected an integer >= 1"),
    ("train.select_on", "val", "expected one of validation, test"),
    ("train.eval_every_epochs", -1, "expected an integer >= 0"),
    ("detect.target_fpr", 0.0, "expected a finite number in (0, 1)"),
    ("detect.holdout_share", 1.0, "expected a finite number in [0, 1)"),
    ("detect.threshold", "max", "expected one of fpr, f1"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_a_bad_setting_is_refused_by_name(key, value, expected):
  config = default_config()
  _set(config, key, value)
  with pytest.raises(UserError) as err:
    validate_config(config)
  message = str(err.value)
  assert message.startswith(f"config.{key} = "), message
  assert expected in message, message
  assert "\n" not in message


def test_a_bool_is_not_a_number():
  config = default_config()
  config.unlock()
  config.projector.depth = True   # ml_collections keeps the int field's value as given
  assert any(p.startswith("config.projector.depth = True") for p in config_problems(config))


def test_relations_between_settings():
  config = default_config()
  config.data.max_shots = 4   # shots (1, 4, 8)
  assert config_problems(config) == [
      "config.data.max_shots = 4: expected >= max(config.data.shots) = 8 (the batch holds at "
      "most max_shots references)"]
  config = default_config()
  config.optim.decay_epochs = (9, 7)
  assert "strictly ascending" in config_problems(config)[0]
  config.optim.decay_epochs = (0, 7)
  assert "strictly ascending" in config_problems(config)[0]
  config.optim.decay_epochs = (7, 9)
  config.optim.epochs = 5
  assert "expected each < config.optim.epochs = 5" in config_problems(config)[0]
  config.optim.decay_epochs = ()
  assert config_problems(config) == []
  config.loss.angle = config.loss.norm = False
  assert "expected at least one loss" in config_problems(config)[0]
  # Evaluating a finished run does not judge how it was trained.
  config.optim.decay_epochs = (7, 9)
  assert config_problems(config, training=False) == []
  assert validate_config(config, training=False) is config


def test_every_problem_is_reported_at_once_and_missing_keys_are_left_alone():
  config = default_config()
  config.optim.lr = math.nan
  config.projector.depth = 0
  config.loss.temperature = 0.0
  with pytest.raises(UserError, match=r"^3 bad settings: config.projector.depth = 0: .*; "
                                      r"config.loss.temperature = 0.0: .*; config.optim.lr = "
                                      r"nan: "):
    validate_config(config)
  # A config from an older run may lack keys: what is there is checked.
  config = default_config()
  del config.detect
  del config.train["compilation_cache"]
  assert config_problems(config) == []


# ----------------------------------------------------------------------------- entry points
@pytest.mark.parametrize("command", ["pretrain", "refs", "centers", "evaluate"])
def test_cli_refuses_nan_lr_before_writing_anything(command, tmp_path, capsys):
  workdir = tmp_path / "run"
  if command == "evaluate":
    workdir.mkdir()
  argv = [command, "--workdir", str(workdir), "--config.optim.lr=nan"]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"adjax {command}: error: config.optim.lr = nan: expected a finite number "
                 "> 0"), err
  assert sorted(os.listdir(tmp_path)) == (["run"] if command == "evaluate" else [])
  if command == "evaluate":
    assert os.listdir(workdir) == []


def test_cli_fit_and_sweep_refuse_bad_settings(tmp_path, capsys):
  images = tmp_path / "good"
  images.mkdir()
  assert main(["fit", "--method", "patchcore", "--train", str(images), "--out",
               str(tmp_path / "det"), "--config.eval.batch_size=0"]) == 2
  assert "config.eval.batch_size = 0: expected an integer >= 1" in capsys.readouterr().err
  assert not (tmp_path / "det").exists()
  sweep_dir = tmp_path / "sweep"
  assert main(["sweep", f"{EXPERIMENTS}/ablations.py:temperature_sweep", "--workdir",
               str(sweep_dir), "--config.projector.depth=0"]) == 2
  err = capsys.readouterr().err
  assert "sweep point 'temperature-0.05': config.projector.depth = 0" in err
  assert not sweep_dir.exists()


def test_library_entry_points_refuse_before_writing(tmp_path):
  from adjax.demo import run_demo
  from adjax.evaluate import evaluate
  from adjax.pretrain import pretrain
  config = tiny_config(str(tmp_path / "data"))
  config.loss.temperature = 0.0
  with pytest.raises(UserError, match=r"config.loss.temperature = 0.0"):
    pretrain(config, str(tmp_path / "run"), progress=False)
  config = _eval_config(str(tmp_path / "data"), ("patchcore",), ("original",))
  config.eval.batch_size = 0
  with pytest.raises(UserError, match=r"config.eval.batch_size = 0"):
    evaluate(config, None, str(tmp_path / "out"))
  with pytest.raises(UserError, match=r"config.optim.max_steps = -1"):
    run_demo({"workdir": str(tmp_path / "demo"), "demo.data_dir": str(tmp_path / "data"),
              "optim.max_steps": "-1"})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- strict JSON
def test_print_json_writes_strict_json(capsys):
  import jax.numpy as jnp
  summary = {"loss": math.nan, "best": math.inf, "scores": [1.5, -math.inf, np.float32("nan")],
             "nested": {"auroc": np.float64("nan"), "steps": np.int64(3), "ok": True},
             "centre": np.zeros((2, 3), np.float32), "scalar": jnp.float32(np.nan),
             "tuple": (1, math.nan), "path": pathlib.Path("/x"), "none": None}
  print_json(summary)
  line = capsys.readouterr().out.strip()
  assert "NaN" not in line and "Infinity" not in line
  parsed = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}"))
  assert parsed == {"loss": None, "best": None, "scores": [1.5, None, None],
                    "nested": {"auroc": None, "steps": 3, "ok": True},
                    "centre": {"shape": [2, 3], "dtype": "float32"}, "scalar": None,
                    "tuple": [1, None], "path": "/x", "none": None}
  print_json([math.nan])
  assert capsys.readouterr().out.strip() == "[null]"
