"""One writer per workdir (issue 14 item 2): a live holder refuses a second trainer at once, a killed one does not.

The holder is a small subprocess that takes the lock as calm-train does and sleeps;
the second trainer, the reader and the rerun run in-process on one device.
"""
import os
import signal
import socket
import subprocess
import sys

import jax
import pytest

from calm_jax import runs
from calm_jax.training import loop
from calm_jax.training import workdir_lock
from tests.test_reliability import ROOT, _config, _final_per_step

pytestmark = pytest.mark.faults

_HOLD = ("import sys, time; from calm_jax.training import workdir_lock as w; "
         "w.WorkdirLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(300)")


def _hold(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_writer_refuses_a_second_and_a_killed_one_does_not(tiny_tokenizer_path, tmp_path):
  one = jax.devices()[:1]
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 2, 2), workdir, one)
  before = sorted(os.listdir(workdir)), _final_per_step(workdir)
  holder = _hold(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match=rf"in use by host {socket.gethostname()} pid {holder.pid}\b"):
      loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), workdir, one)
    assert (sorted(os.listdir(workdir)), _final_per_step(workdir)) == before   # nothing written
    run = runs.open_run(workdir, devices=one)       # a reader beside the writer
    assert run.step == 2
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kill left the lock file behind, but not the lock: the rerun goes on.
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), workdir, one)
  assert sorted(_final_per_step(workdir)) == [1, 2, 3, 4]


def test_a_workdir_that_is_a_file_is_a_user_error(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(workdir_lock.errors.UserError, match="is a file, not a directory"):
    with workdir_lock.WorkdirLock(str(path)):
      pass
  assert path.read_text() == "x"
