"""Experiment configs, config loading with typed overrides, and the sweep launcher/collector.

Covers adjax/config_loading.py, adjax/sweep.py and experiments/*.py. The sweep tests use a toy
experiment file whose `run` records its calls, returns results or raises.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shlex
import textwrap

import ml_collections
import pytest

from adjax.io import files
from adjax import run_layout
from adjax.configs import loading as config_loading
from adjax.cli import main
from adjax.configs import default_config
from adjax.models.backbones import get_backbone

REPO = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
PAPER_BACKBONES = ("dinov2-base", "dinov2-large", "clip-base", "clip-large", "imagebind")
METHODS = ("patchcore", "padim", "featurenorm", "cflow", "uniad", "glass")
DATASETS = ("mvtec", "visa", "btad", "mpdd", "mvtec3d")


def _load(name: str, arg: str | None = None):
  spec = str(EXPERIMENTS / name) + (f":{arg}" if arg is not None else "")
  return config_loading.load_config(spec)


def _assert_runlocal_small(c: ml_collections.ConfigDict) -> None:
  dims = get_backbone(c.backbone.name).level_dims
  assert c.backbone.name == "efficientnet-lite0"
  assert c.image_size <= 160 and c.data.batch_size <= 8
  assert 0 < c.optim.max_steps <= 50 and c.projector.num_ref_tokens <= 256
  assert all(d % c.projector.num_heads == 0 for d in dims), (dims, c.projector.num_heads)
  assert max(c.data.shots) <= c.data.max_shots <= 4 and c.eval.shots <= 4
  assert c.data.pretrain_root.endswith("pretrain") and c.eval.root.endswith("eval")


# ----------------------------------------------------------------------------- experiments
def test_every_experiment_file_has_get_config_and_a_launch_command():
  files = sorted(p for p in EXPERIMENTS.glob("*.py") if p.name not in ("__init__.py",
                                                                       "common.py"))
  assert {p.name for p in files} >= {"pretrain.py", "downstream.py", "ablations.py"}
  for path in files:
    module = config_loading.load_module(str(path))
    assert callable(module.get_config), path
    # The launch command names the file itself.
    assert "adjax " in module.__doc__ and f"experiments/{path.name}" in module.__doc__, path
    assert isinstance(module.get_config(), ml_collections.ConfigDict)


@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_pretrain_variants(backbone):
  c = _load("pretrain.py", f"backbone={backbone}")
  dims = get_backbone(backbone).level_dims
  assert c.backbone.name == backbone and c.image_size == 224
  assert all(d % c.projector.num_heads == 0 for d in dims)
  # The paper's recipe is untouched (docs/method.md section 5), compared with the default config.
  ref = default_config()
  for key in ("data.batch_size", "data.shots", "optim.lr", "optim.weight_decay",
              "optim.epochs", "optim.decay_epochs", "loss.temperature",
              "projector.num_ref_tokens", "train.dtype"):
    group, field = key.split(".")
    assert c[group][field] == ref[group][field], key
  # The experiments' backbone table agrees with the backbone registry.
  from adjax.configs.shared import paper_backbones
  assert (paper_backbones()[backbone]["dim"],) * 4 == tuple(dims)
  small = _load("pretrain.py", f"backbone={backbone},runlocal")
  _assert_runlocal_small(small)


def test_pretrain_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
    _load("pretrain.py", "backbone=vgg")
  with pytest.raises(ValueError, match="unknown config argument 'bakbone'"):
    _load("pretrain.py", "bakbone=clip-base")


@pytest.mark.parametrize("method", METHODS)
def test_downstream_variants(method):
  # docs/method.md section 6
  expected_checkpoint = "angle" if method in ("patchcore", "padim") else "norm"
  for dataset in DATASETS:
    c = _load("downstream.py", f"method={method},dataset={dataset}")
    assert c.eval.methods == (method,) and c.eval.format == dataset
    assert c.eval.features == ("original", "pretrained") and c.eval.shots == 8
    assert c.eval.checkpoint == expected_checkpoint
    # The reference's Resize(256) + CenterCrop(224) of PatchCore and PaDiM on MVTec AD.
    assert c.eval.resize == (256 if method in ("patchcore", "padim") and dataset == "mvtec"
                             else 0)
    # GLASS's MVTec AD loader zooms toothbrush and wood: Resize(round(224 * 329 / 288)).
    assert dict(c.eval.class_resize) == ({"toothbrush": 256, "wood": 256}
                                         if method == "glass" and dataset == "mvtec" else {})
  other = "norm" if expected_checkpoint == "angle" else "angle"
  c = _load("downstream.py", f"method={method},checkpoint={other},backbone=clip-base")
  assert c.eval.checkpoint == other and c.backbone.name == "clip-base"
  # A run keeps only the two selected checkpoints: evaluate could not load any other.
  with pytest.raises(ValueError, match="checkpoint must be angle or norm, got 'latest'"):
    _load("downstream.py", f"method={method},checkpoint=latest")
  small = _load("downstream.py", f"method={method},runlocal,data=/tmp/emb")
  _assert_runlocal_small(small)
  assert small.eval.resize == 0     # the embedded set at its own size: no 256/224 zoom
  assert small.eval.root == "/tmp/emb/eval"


def test_ablation_sweeps_apply_and_change_what_they_name():
  ablations = config_loading.load_module(str(EXPERIMENTS / "ablations.py"))
  names = []
  for sweep in (ablations.loss_sweep, ablations.center_sweep, ablations.residual_sweep,
                ablations.depth_sweep, ablations.ref_tokens_sweep, ablations.temperature_sweep,
                ablations.shots_sweep, ablations.augment_sweep):
    points = sweep()
    assert len(points) >= 2
    for name, overrides in points:
      names.append(name)
      c = config_loading.apply_overrides(ablations.get_config("runlocal"), overrides)
      for key, value in overrides.items():
        group, field = key.split(".")
        want = tuple(value) if isinstance(value, (list, tuple)) else value
        assert c[group][field] == want, (name, key)
  assert sorted(names) == sorted(n for n, _ in ablations.all_sweep())
  assert len(set(names)) == len(names)
  loss = {n: (o["loss.angle"], o["loss.norm"]) for n, o in ablations.loss_sweep()}
  assert sorted(loss.values()) == [(False, True), (True, False), (True, True)]
  assert {o["projector.depth"] for _, o in ablations.depth_sweep()} == {1, 2}
  assert {o["projector.num_ref_tokens"] for _, o in ablations.ref_tokens_sweep()} == {512, 2048}
  assert {o["loss.center"] for _, o in ablations.center_sweep()} == {True, False}
  assert {o["loss.residual"] for _, o in ablations.residual_sweep()} == {True, False}
  assert {o["data.augment"] for _, o in ablations.augment_sweep()} == {True, False}
  assert 0.15 in {o["loss.temperature"] for _, o in ablations.temperature_sweep()}
  for _, o in ablations.shots_sweep():
    assert o["data.max_shots"] == max(o["data.shots"])


# ----------------------------------------------------------------------------- config loading
def test_overrides_take_the_field_types():
  c = default_config()
  rest, overrides = config_loading.split_overrides(
      ["--workdir", "w", "--config.optim.lr=3e-4", "--config.loss.center", "off",
       "--config.data.batch_size=1e2", "--config.optim.epochs=3", "--config.image_size", "96",
       "--config.data.shots=(2, 4)", "--config.eval.methods=padim,glass",
       "--config.backbone.taps=3,6", "--config.backbone.name=clip-base",
       "--config.data.augment=True", "--config.optim.decay_epochs=()",
       "--config.loss.temperature=1"])
  assert rest == ["--workdir", "w"]
  config_loading.apply_overrides(c, overrides)
  assert c.optim.lr == pytest.approx(3e-4) and type(c.optim.lr) is float
  assert c.loss.center is False and c.data.augment is True
  assert c.data.batch_size == 100 and type(c.data.batch_size) is int
  assert c.optim.epochs == 3 and c.image_size == 96
  assert c.data.shots == (2, 4) and c.eval.methods == ("padim", "glass")
  assert c.backbone.taps == (3, 6)        # a None field declared as a tuple
  assert c.backbone.name == "clip-base" and c.optim.decay_epochs == ()
  assert c.loss.temperature == 1.0 and type(c.loss.temperature) is float
  # Sweep overrides are Python values: int into a float field is fine, a string is not.
  config_loading.apply_overrides(c, {"loss.temperature": 2, "data.shots": [8]})
  assert type(c.loss.temperature) is float and c.data.shots == (8,)
  with pytest.raises(ValueError, match="'data.batch_size': expected int"):
    config_loading.apply_overrides(c, {"data.batch_size": 1.5})
  # The command-line form written for emitted commands reads back to the same values.
  for key, value in (("data.shots", (1, 4)), ("loss.center", False), ("optim.lr", 0.25),
                     ("data.shots", (4,)), ("eval.methods", ("padim",))):
    _, pairs = config_loading.split_overrides([config_loading.format_override(key, value)])
    config_loading.apply_overrides(c, pairs)
    group, field = key.split(".")
    assert c[group][field] == value


def test_open_groups_take_new_keys_and_whole_dicts():
  """eval.method_settings and eval.class_resize are keyed by the user's names: an override adds
  keys (typed by their text) or replaces the whole group with a dict; elsewhere a new key is
  still an error."""
  c = default_config()
  _, overrides = config_loading.split_overrides(
      ["--config.eval.method_settings.glass.epochs=100",
       "--config.eval.method_settings.glass.projection=false",
       "--config.eval.method_settings.glass.texture_annulus=(2.0, 3.0)",
       "--config.eval.method_settings.cflow.backbone_name=none",
       "--config.eval.class_resize.metal-nut=256"])
  config_loading.apply_overrides(c, overrides)
  assert c.eval.method_settings.to_dict() == {
      "glass": {"epochs": 100, "projection": False, "texture_annulus": (2.0, 3.0)},
      "cflow": {"backbone_name": None}}
  assert c.eval.class_resize.to_dict() == {"metal-nut": 256}
  # A key set before keeps its type.
  with pytest.raises(ValueError, match="'eval.method_settings.glass.epochs': expected an "
                                       "integer, got 'many'"):
    config_loading.apply_overrides(c, [("eval.method_settings.glass.epochs", "many")])
  # A whole group: JSON, a Python literal (as format_override writes it) or a dict.
  for text in ('{"patchcore": {"coreset_ratio": 0.1, "exact": true}}',
               "{'patchcore': {'coreset_ratio': 0.1, 'exact': True}}"):
    config_loading.apply_overrides(c, [("eval.method_settings", text)])
    assert c.eval.method_settings.to_dict() == {"patchcore": {"coreset_ratio": 0.1,
                                                              "exact": True}}
  value = {"glass": {"epochs": 3, "texture_annulus": (2.0, 3.0)}}
  for given in (value, ml_collections.ConfigDict(value)):
    _, pairs = config_loading.split_overrides(
        [config_loading.format_override("eval.method_settings", given)])
    config_loading.apply_overrides(c, pairs)
    assert c.eval.method_settings.to_dict() == value
  config_loading.apply_overrides(c, {"eval.class_resize": {"wood": 256}})
  assert c.eval.class_resize.to_dict() == {"wood": 256}
  with pytest.raises(ValueError, match="'eval.method_settings' is a group keyed by your names: "
                                       "expected a dict"):
    config_loading.apply_overrides(c, [("eval.method_settings", "glass")])
  with pytest.raises(ValueError, match="unknown config key 'eval.shot'"):
    config_loading.apply_overrides(c, [("eval.shot", "3")])
  with pytest.raises(ValueError, match="'eval' is a group of settings"):
    config_loading.apply_overrides(c, [("eval", "{}")])


def test_unknown_override_key_names_it():
  c = default_config()
  with pytest.raises(ValueError, match=r"unknown config key 'loss\.angel'; did you mean "
                                       r"'loss\.angle'\?"):
    config_loading.apply_overrides(c, [("loss.angel", "true")])
  with pytest.raises(ValueError, match="unknown config key 'optim.lr.x'"):
    config_loading.apply_overrides(c, [("optim.lr.x", "1")])
  with pytest.raises(ValueError, match="has no value"):
    config_loading.split_overrides(["--config.optim.lr"])


def test_parse_arg_and_config_spec():
  assert config_loading.parse_arg("backbone=clip-base,runlocal,steps=5", backbone="dinov2-base",
                                  runlocal=False, steps=10) == {
                                      "backbone": "clip-base", "runlocal": True, "steps": 5}
  assert config_loading.parse_arg(None, a=1) == {"a": 1}
  assert config_loading.parse_config_spec("x/y.py:a=1,b:c") == ("x/y.py", "a=1,b:c")
  assert config_loading.parse_config_spec("x/y.py") == ("x/y.py", None)
  with pytest.raises(FileNotFoundError, match="config file not found"):
    config_loading.load_config("no/such/file.py:runlocal")


# ----------------------------------------------------------------------------- sweeps
TOY = '''
"""A toy sweep: run() records its call, fails when config.fail, returns results."""
import os
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.value = 1
  c.fail = False
  c.preempt = False
  c.scale = 10.0
  return c

def toy_sweep():
  return [("a", {"value": 1}), ("b", {"value": 2, "fail": True}), ("c", {"value": 3})]

def preempt_sweep():
  return [("a", {"value": 1}), ("p", {"value": 2, "preempt": True}), ("c", {"value": 3})]

def typo_sweep():
  return [("a", {"value": 1}), ("z", {"valu": 2})]

def run(config, workdir):
  with open(os.path.join(os.path.dirname(workdir), "calls.txt"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
  if config.fail:
    raise RuntimeError(f"boom {config.value}")
  if config.preempt:
    from adjax.errors import Preempted
    raise Preempted("preempted at step 3 of 9")
  return {"score": config.value * config.scale, "eval": {"image_auroc": config.value / 10}}
'''


@pytest.fixture
def toy(tmp_path):
  path = tmp_path / "toy.py"
  path.write_text(textwrap.dedent(TOY))
  return str(path), str(tmp_path / "sweep")


def _calls(sweep_dir: str) -> list[str]:
  path = os.path.join(sweep_dir, "calls.txt")
  return open(path).read().split() if os.path.exists(path) else []


def test_sweep_failed_point_does_not_stop_others_and_rerun_skips_done(toy, capsys):
  path, sweep_dir = toy
  assert main(["sweep", f"{path}:toy_sweep", "--workdir", sweep_dir]) == 1  # one failed
  assert _calls(sweep_dir) == ["a", "b", "c"]
  done = {n: os.path.isfile(os.path.join(sweep_dir, n, "DONE")) for n in "abc"}
  assert done == {"a": True, "b": False, "c": True}
  failed = files.read_json(os.path.join(sweep_dir, "b", "results.json"))
  assert failed["status"] == "failed" and "RuntimeError: boom 2" in failed["error"]
  assert "Traceback" in open(os.path.join(sweep_dir, "b", "error.log")).read()
  ok = files.read_json(os.path.join(sweep_dir, "c", "results.json"))
  assert ok["status"] == "done" and ok["results"]["score"] == 30.0
  assert ok["overrides"] == {"value": 3}
  assert run_layout.load_config(os.path.join(sweep_dir, "c")).value == 3  # the point's config
  capsys.readouterr()

  # Rerun: a and c are skipped, b is retried (and fails again).
  assert main(["sweep", path, "--sweep", "toy_sweep", "--workdir", sweep_dir]) == 1
  assert _calls(sweep_dir) == ["a", "b", "c", "b"]
  # A command-line override applies after every point's own: b now succeeds.
  assert main(["sweep", f"{path}:toy_sweep", "--workdir", sweep_dir,
               "--config.fail=false", "--config.scale=100"]) == 0
  assert _calls(sweep_dir) == ["a", "b", "c", "b", "b"]
  assert files.read_json(os.path.join(sweep_dir, "b", "results.json"))["results"] == {
      "score": 200.0, "eval": {"image_auroc": 0.2}}
  captured = capsys.readouterr()
  assert json.loads(captured.out.strip().splitlines()[-1]) == {
      "done": ["b"], "skipped": ["a", "c"], "failed": [], "preempted": []}
  # The done points were kept, but their other settings are said.
  assert "a: already done, skipped; NOTE: it ran with other settings: scale (10.0 there, " \
      "100.0 here)" in captured.err


def test_sweep_stops_at_a_preempted_point_and_resumes_it(toy, capsys):
  path, sweep_dir = toy
  assert main(["sweep", f"{path}:preempt_sweep", "--workdir", sweep_dir]) == 143
  assert _calls(sweep_dir) == ["a", "p"]   # c waits for the rerun
  record = files.read_json(os.path.join(sweep_dir, "p", "results.json"))
  assert record["status"] == "preempted" and "step 3 of 9" in record["error"]
  assert not os.path.exists(os.path.join(sweep_dir, "p", "DONE"))
  assert "p: preempted at step 3 of 9; run the sweep again to resume it" in capsys.readouterr().err
  assert main(["sweep", f"{path}:preempt_sweep", "--workdir", sweep_dir,
               "--config.preempt=false"]) == 0
  assert _calls(sweep_dir) == ["a", "p", "p", "c"]
  assert os.path.exists(os.path.join(sweep_dir, "p", "DONE"))


def test_sweep_bad_points_fail_before_anything_runs(toy, capsys):
  path, sweep_dir = toy
  assert main(["sweep", f"{path}:typo_sweep", "--workdir", sweep_dir]) == 2
  line = capsys.readouterr().err.strip()
  assert "sweep point 'z'" in line and "unknown config key 'valu'" in line
  assert _calls(sweep_dir) == []
  assert main(["sweep", f"{path}:nope", "--workdir", sweep_dir]) == 2
  assert ("has no sweep function 'nope'; it has: preempt_sweep, toy_sweep, typo_sweep"
          in capsys.readouterr().err)
  assert main(["sweep", path, "--workdir", sweep_dir]) == 2
  assert "--sweep NAME" in capsys.readouterr().err


def test_sweep_emit_writes_one_command_per_point_that_runs_that_point(toy, tmp_path):
  path, sweep_dir = toy
  out = str(tmp_path / "commands.txt")
  assert main(["sweep", f"{path}:toy_sweep", "--workdir", sweep_dir, "--emit", out,
               "--config.scale=2"]) == 0
  lines = open(out).read().splitlines()
  assert len(lines) == 3 and _calls(sweep_dir) == []
  argvs = [shlex.split(line) for line in lines]
  for argv, name in zip(argvs, "abc"):
    assert argv[:2] == ["adjax", "sweep"] and argv[argv.index("--only") + 1] == name
    assert "--config.scale=2" in argv
  assert main(argvs[2][1:]) == 0          # the cluster job of point c, run here
  assert _calls(sweep_dir) == ["c"]
  assert files.read_json(os.path.join(sweep_dir, "c", "results.json"))["results"][
      "score"] == 6.0


def test_collect_builds_one_table_and_one_plot(toy, tmp_path):
  path, sweep_dir = toy
  main(["sweep", f"{path}:toy_sweep", "--workdir", sweep_dir])
  # A point a job left with its own results.json only (no sweep record around it).
  os.makedirs(os.path.join(sweep_dir, "extra"))
  files.write_json(os.path.join(sweep_dir, "extra", "results.json"),
                        {"score": 7.5, "eval": {"image_auroc": 0.5}})
  out_dir = str(tmp_path / "table")
  assert main(["collect", sweep_dir, "--out", out_dir]) == 0

  with open(os.path.join(out_dir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["a", "b", "c", "extra"]
  assert [r["status"] for r in rows] == ["done", "failed", "done", "done"]
  # The values are those each run computed: value * scale and value / 10.
  assert [r["score"] for r in rows] == ["10.0", "", "30.0", "7.5"]
  assert [r["eval/image_auroc"] for r in rows] == ["0.1", "", "0.3", "0.5"]
  assert [r["value"] for r in rows] == ["1", "2", "3", ""]
  assert "boom 2" in rows[1]["error"]

  md = open(os.path.join(out_dir, "results.md")).read().splitlines()
  assert md[0].startswith("| point | status |") and "eval/image_auroc" in md[0]
  assert len(md) == 2 + 4 and md[4].startswith("| c | done |")
  with open(os.path.join(out_dir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  assert main(["collect", str(tmp_path / "empty")]) == 2
  assert main(["collect", sweep_dir, "--metric", "nope"]) == 2
