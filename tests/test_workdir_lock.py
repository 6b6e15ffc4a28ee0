"""One writer per folder (adjax/workdir_lock.py): a second process is refused naming the holder,
a dead holder's lock is taken over, another host's is honoured, the lock goes with the job."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from adjax import workdir_lock
from adjax.cli import main
from adjax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from adjax import workdir_lock
    with workdir_lock.hold({folder!r}, "pretrain"):
      print("LOCKED", flush=True)
      time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path):
  """A second process that holds the lock of tmp_path/run (until SIGTERM)."""
  folder = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO), folder=folder)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "LOCKED", proc.stderr.read()
    yield folder, proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_a_second_process_is_refused_naming_the_holder(holder, capsys):
  folder, proc = holder
  lock = workdir_lock.lock_path(folder)
  record = json.load(open(lock))
  assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
  assert record["command"] == "pretrain" and record["started"]
  with pytest.raises(UserError) as err:
    workdir_lock.acquire(folder, "evaluate")
  assert f"pid {proc.pid} on host {socket.gethostname()}" in str(err.value)
  assert lock in str(err.value)
  # Through the command: one line, exit 2 (evaluate locks its --out before the slow part).
  assert main(["evaluate", "--out", folder, f"--config.eval.root={folder}",
               "--config.eval.features=original,residual"]) == 2
  line = capsys.readouterr().err.strip()
  assert "\n" not in line and line.startswith("adjax evaluate: error: ")
  assert f"pid {proc.pid}" in line and lock in line
  # SIGTERM: the holder unwinds, releases the lock and exits as SIGTERM's status says.
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 143
  assert not os.path.exists(lock)
  with workdir_lock.hold(folder, "evaluate") as path:
    assert json.load(open(path))["pid"] == os.getpid()
  assert not os.path.exists(lock)


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
  folder = str(tmp_path)
  lock = workdir_lock.lock_path(folder)
  pid = _dead_pid()
  with open(lock, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "command": "pretrain",
               "started": "2020-01-01T00:00:00+00:00"}, f)
  with caplog.at_level(logging.WARNING, logger="adjax.lock"):
    with workdir_lock.hold(folder, "pretrain") as path:
      assert json.load(open(path))["pid"] == os.getpid()
  assert f"pid {pid}" in caplog.text and "no longer runs" in caplog.text
  assert sorted(os.listdir(folder)) == []   # released, and nothing set aside is left


def test_another_hosts_lock_is_honoured(tmp_path):
  lock = workdir_lock.lock_path(str(tmp_path))
  with open(lock, "w") as f:
    json.dump({"host": "elsewhere.example", "pid": _dead_pid(), "command": "evaluate",
               "started": "x"}, f)
  with pytest.raises(UserError, match=r"host elsewhere\.example.*delete the lock"):
    workdir_lock.acquire(str(tmp_path), "pretrain")
  assert json.load(open(lock))["host"] == "elsewhere.example"


def test_released_on_error_reentrant_and_a_new_empty_folder_goes(tmp_path):
  folder = str(tmp_path / "new")
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(folder, "pretrain"):
      with workdir_lock.hold(folder, "centers"):   # pretrain computing its centres
        pass
      assert os.path.exists(workdir_lock.lock_path(folder))   # the outer hold keeps it
      raise RuntimeError("boom")
  assert not os.path.exists(folder)   # created by the lock, empty: removed
  os.makedirs(folder)
  with workdir_lock.hold(folder, "pretrain"):
    open(os.path.join(folder, "config.json"), "w").close()
  assert os.listdir(folder) == ["config.json"]


def test_only_process_0_takes_it(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_process",
                      lambda what: 1 if what == "process_index" else 2)
  with workdir_lock.hold(str(tmp_path), "pretrain") as path:
    assert path is None and os.listdir(tmp_path) == []
