"""Building and loading the native CPU kernels (adjax/kernels/native.py)."""

import shutil
import subprocess

import pytest

from adjax.kernels import native


def test_build_reuses_the_cached_library_and_names_it_by_source(tmp_path, monkeypatch):
  if native._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  if not native.available():
    pytest.skip("the native CPU kernel cannot run on this machine")
  built = native.build()          # the library this process loaded (cached by now)
  assert built.name.startswith("reference_attention_cpu-") and built.suffix == ".so"
  shutil.copy(built, tmp_path / built.name)

  def no_compiler(*args, **kwargs):
    raise AssertionError("the compiler ran although the cache held the library")

  monkeypatch.setattr(subprocess, "run", no_compiler)
  assert native.build(tmp_path) == tmp_path / built.name
  # Another source text gets another name: an edited kernel is never confused with a stale one.
  assert native._library_name(b"// edited") != built.name


def test_a_failing_compiler_leaves_nothing_behind_and_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
  with pytest.raises(RuntimeError, match="failed"):
    native.build(tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_a_cpu_without_avx512_is_refused_before_any_build(monkeypatch):
  monkeypatch.setattr(native, "cpu_flags", lambda: {"sse4_2", "avx2", "fma"})

  def no_build(*args, **kwargs):
    raise AssertionError("built a kernel this CPU cannot run")

  monkeypatch.setattr(native, "build", no_build)
  reason = native._load.__wrapped__()   # the uncached check
  assert reason == "the CPU lacks avx512f, avx512dq"


def test_amx_handlers_need_the_cpu_flags(monkeypatch):
  # An AVX-512 CPU without AMX (or without AVX512-BF16 for the conversions between tile
  # products) keeps bfloat16 on the float32 handlers, whatever Linux would grant.
  monkeypatch.setattr(native, "available", lambda: True)
  monkeypatch.setattr(native, "_amx_permission", lambda: True)
  full = {"avx512f", "avx512dq", "fma", *native.AMX_CPU_FLAGS}
  monkeypatch.setattr(native, "cpu_flags", lambda: full)
  assert native.amx_available()
  for missing in native.AMX_CPU_FLAGS:
    monkeypatch.setattr(native, "cpu_flags", lambda: full - {missing})
    assert not native.amx_available(), missing
  monkeypatch.setattr(native, "cpu_flags", lambda: full)
  monkeypatch.setattr(native, "_amx_permission", lambda: False)   # Linux said no
  assert not native.amx_available()


def test_amx_permission_is_asked_of_linux():
  if not native.available() or not all(f in native.cpu_flags() for f in native.AMX_CPU_FLAGS):
    pytest.skip("no AMX on this CPU")
  # The library's own arch_prctl request: granted on a Linux that supports AMX (5.16 and later).
  assert native._amx_permission.__wrapped__() is True
