"""The benchmark scripts run at tiny sizes and print one JSON line with their figures (no
timing is asserted: speed is measured by running them, see the README)."""

import json
import os
import pathlib
import re
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                        capture_output=True, text=True, timeout=300, env=env, check=True)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0])


def test_bench_step_reports_throughput_and_the_machine_rate():
  # With torch (CI installs it), the PyTorch reference step is timed alongside in the same run:
  # one reference step before each of the two timed adjax steps, in a child process.
  import importlib.util
  with_reference = importlib.util.find_spec("torch") is not None
  out = _run("bench_step.py", "--batch", "2", "--dim", "32", "--levels", "2", "--side", "4",
             "--num-ref", "16", "--steps", "2", "--anomalous-share", "0.25",
             *(["--measure-reference"] if with_reference else []))
  assert out["bench"] == "step" and out["levels"] == 2
  # 8 of 32 tokens per view anomalous: 16 rarer-label rows of 64, in one block of 32 rows
  # (blocks are never longer than the 32 tokens of a view).
  assert out["anomalous_share"] == 0.25 and out["angle_rows_per_level"] == 32
  assert out["model_gflops"] <= out["reference_math_gflops"]
  assert out["seconds_min"] <= out["seconds_per_step"] <= out["seconds_max"]
  assert out["images_per_s"] > 0 and out["matmul_gflops_per_s"] > 0
  assert abs(out["share_of_matmul_rate"] - out["gflops_per_s"] / out["matmul_gflops_per_s"]) < 1e-2
  assert out["loss"] == out["loss"]  # finite number, not NaN
  # One CPU device, projector.attention "auto": the blocked form, not the native kernel.
  assert out["attention"] == "blocked" and not out["native_kernel_ran"]
  if with_reference:
    assert out["reference_source"] == "interleaved" and out["reference_seconds_per_step"] > 0
    assert out["reference_seconds_per_step"] != 11.7
    # Both times are printed rounded to 0.1 ms; at toy size (~3 ms) that alone moves the ratio
    # ~3 %.
    expected = out["reference_seconds_per_step"] / out["seconds_per_step"]
    assert abs(out["speedup_vs_reference"] - expected) <= 0.06 * expected
    reference = _run("bench_reference_step.py", "--batch", "2", "--dim", "32", "--levels", "2",
                     "--side", "4", "--num-ref", "16", "--steps", "1")
    assert reference["bench"] == "reference_step" and reference["loss"] == reference["loss"]
  else:
    assert out["reference_source"] == "figure" and out["reference_seconds_per_step"] == 11.7


def test_bench_angle_loss_row_sharded_matches_the_whole_loss():
  out = _run("bench_angle_loss.py", "--devices", "4", "--tokens", "64", "--dim", "16",
             "--block", "8", "--repeats", "1")
  assert out["devices"] == 4 and out["tokens"] == 64
  assert out["loss_diff"] <= 1e-5 * max(1.0, abs(out["loss"]))
  assert out["grad_max_abs_diff"] <= 1e-5 * out["grad_max_abs"]


def test_bench_step_full_mode_with_a_backbone():
  # The mode prepared for the GPU measurement (dinov2-large, batch 32, bfloat16), at toy size.
  out = _run("bench_step.py", "--backbone", "tiny-vit", "--batch", "2", "--steps", "1",
             "--max-shots", "1", "--num-ref", "16", "--image-size", "56")
  assert out["bench"] == "full_step" and out["image_size"] == 56
  assert out["images_per_s"] > 0 and out["loss"] == out["loss"]




def test_bench_attention_reports_both_passes_and_the_handler():
  from adjax.kernels import native
  if native.available():   # else "native_cpu" is refused (tests/models/test_reference_attention.py)
    out = _run("bench_attention.py", "--heads", "2", "--queries", "40", "--refs", "50",
               "--dim", "16", "--dtype", "bfloat16", "--repeats", "1", "--attention",
               "native_cpu")
    assert out["bench"] == "attention" and out["dtype"] == "bfloat16"
    assert out["attention"] == "native_cpu"
    assert out["handler"] == ("native_cpu_amx" if native.amx_available() else "native_cpu")
    assert 0 < out["forward_ms"] and 0 < out["forward_backward_ms"]
    assert out["forward_gflops_per_s"] > 0 and out["forward_backward_gflops_per_s"] > 0
  blocked = _run("bench_attention.py", "--heads", "2", "--queries", "40", "--refs", "50",
                 "--dim", "16", "--attention", "blocked", "--repeats", "1")
  assert blocked["handler"] == "xla" and blocked["dtype"] == "float32"
  assert blocked["attention"] == "blocked"


def test_bench_linear_times_both_products():
  out = _run("bench_linear.py", "--tokens", "64", "--dim-in", "32", "--dim-out", "48",
             "--repeats", "1")
  assert out["bench"] == "linear" and out["dtype"] == "bfloat16"
  assert out["matmul_ms"] > 0 and out["plain_ms"] > 0
  assert out["matmul_gflops_per_s"] > 0 and out["plain_gflops_per_s"] > 0


def test_scale_model_reports_memory_flops_and_the_gradient_all_reduce():
  # Two virtual devices, the tiny ViT at 56 px, the reference bank: one JSON line whose
  # all-reduce carries at least every projector gradient (float32), and whose projection is
  # the analytic FLOPs at the stated MFU plus the collective bytes over the stated link.
  import jax
  from adjax.models.backbones import get_backbone
  from adjax.models.projector import init_projector
  out = _run("scale_model.py", "--backbone", "tiny-vit", "--devices", "2", "--batch", "2",
             "--max-shots", "1", "--num-ref", "16", "--num-heads", "4", "--refs", "bank",
             "--image-size", "56")
  assert out["bench"] == "scale_model" and out["devices"] == 2 and out["refs"] == "bank"
  assert out["compiled_devices"] == 2 and out["attention"] == "dense"
  memory = out["memory_per_device"]
  assert memory["argument_bytes"] > 0 and memory["peak_estimate_bytes"] > 0
  backbone = get_backbone("tiny-vit")
  params = jax.eval_shape(lambda: init_projector(jax.random.key(0), backbone.level_dims,
                                                 num_heads=4, num_ref_tokens=16))
  # The token-side layers' weight gradients are sums over every device's tokens: all-reduced
  # whole. (The reference side's, from replicated reference tokens, XLA may reduce as smaller
  # (R, C) intermediates before their products.)
  token_side = [x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if re.search(r"(cross_attn']\['(query|out)|mlp']\['fc[12])']\['kernel",
                             jax.tree_util.keystr(path))]
  assert len(token_side) == 4 * len(backbone.level_dims)
  gradient_bytes = 4 * sum(x.size for x in token_side)
  assert out["collectives_per_device"]["all-reduce"]["payload_bytes"] >= gradient_bytes
  flops = out["analytic_flops_per_device"]
  assert flops["total"] == sum(flops[k] for k in ("backbone", "residual", "projector",
                                                  "angle_loss"))
  h100 = out["projection"]["H100"]
  want = flops["total"] / (989e12 * 0.4) + out["collective_sent_bytes_per_device"] / 450e9
  assert abs(h100["step_s"] - want) <= 1e-4 + 1e-3 * want


def test_bench_predict_times_fit_predict_and_evaluate():
  out = _run("bench_predict.py", "--images", "6", "--size", "48", "--batch", "4",
             "--methods", "featurenorm", "--features", "original,pretrained")
  assert out["benchmark"] == "predict" and out["backbone"] == "efficientnet-lite0"
  assert [(r["method"], r["features"]) for r in out["results"]] == [
      ("featurenorm", "original"), ("featurenorm", "pretrained")]
  for r in out["results"]:
    assert r["test_images"] > 0 and r["fit_images"] > 0
    assert r["predict_images_per_s"] > 0 and r["evaluate_style_s_per_image"] > 0
    assert r["evaluate_s"] > 0 and r["fit_s"] > 0
