"""A tiny run you can watch: profiler trace, step times, data wait and goodput in every logged row,
the metric writers (TensorBoard event files, W&B offline when installed, asynchronous writes),
calm-plot of the real run beside a fake one."""
import glob
import importlib.util
import json
import os
import struct
import threading

import jax
import matplotlib.image
import pytest

from calm_jax import config as config_lib
from calm_jax import errors
from calm_jax.cli import plot
from calm_jax.training import efficiency
from calm_jax.training import loop
from calm_jax.training import metrics as metrics_lib
from tests import run_helpers
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.integration

STEPS = 6
HAS_WANDB = importlib.util.find_spec("wandb") is not None
OFFLINE_WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true"}


@pytest.fixture(scope="module")
def watched_run(tiny_tokenizer_path, tmp_path_factory):
  """A 6-step AR run logging every 2 steps, profiling steps 2-4, saving at 3 and 6; it also
  logs to an offline W&B run when wandb is installed."""
  workdir = str(tmp_path_factory.mktemp("watched"))
  config = run_helpers.tiny_run_config(
      "ar_baseline.py:size=tiny", tiny_tokenizer_path, TINY_VOCAB, train__steps=STEPS,
      train__log_every=2, train__profile_steps=(2, 4), checkpoint__every_steps=3,
      log__wandb_project="calm-test" if HAS_WANDB else "")
  saved = {k: os.environ.get(k) for k in OFFLINE_WANDB}
  os.environ.update(OFFLINE_WANDB)
  try:
    loop.train_and_evaluate(config, workdir, jax.devices()[:1])
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key)
      else:
        os.environ[key] = value
  return workdir


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_profile_steps_write_a_trace_tensorboard_reads(watched_run):
  traces = glob.glob(os.path.join(watched_run, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces and all(os.path.getsize(p) > 0 for p in traces)


def test_every_logged_row_carries_step_times_data_wait_and_goodput(watched_run):
  rows = [r for r in _rows(watched_run) if "loss" in r]
  assert [r["step"] for r in rows] == [2, 4, 6]
  for row in rows:
    assert 0 < row["step_time_s_p50"] <= row["step_time_s_p90"]
    assert 0 <= row["data_wait_fraction"] <= 1
    assert 0 < row["goodput"] < 1
  goodputs = [r["goodput"] for r in rows]
  assert goodputs[-1] > goodputs[0]          # start-up weighs less as the run goes on (one
                                             # slow step on a loaded machine may dip between)
  with open(os.path.join(watched_run, efficiency.GOODPUT_FILE)) as f:
    ledger = json.load(f)
  assert ledger["step"] == STEPS and sorted(ledger["saved"], key=int) == ["0", "3", "6"]
  assert 0 < ledger["productive_s"] < ledger["wall_s"]


def _tensorboard_scalars(workdir):
  """{tag: {step: value}} from the TFRecord event files under WORKDIR/tensorboard."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4              # length, its crc, the record, its crc
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_event_files_hold_every_logged_scalar(watched_run):
  scalars = _tensorboard_scalars(watched_run)
  rows = {r["step"]: r for r in _rows(watched_run)}
  for key in ("loss", "lr", "tokens_per_s", "step_time_s_p50", "data_wait_fraction", "goodput"):
    assert scalars[key] == pytest.approx({s: rows[s][key] for s in (2, 4, 6)}, rel=1e-6), key


def _wandb_history(path):
  """The rows an offline W&B run file (leveldb-log framed protobuf Records) holds."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, chunks, rows = 7, 32768, [], []
  while pos + 7 <= len(data):
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if block - pos % block < 7 or (kind == 0 and length == 0):
      pos += block - pos % block        # the rest of a block is padding
      continue
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):                  # FULL or LAST fragment
      record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
      chunks = []
      if record.WhichOneof("record_type") == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item})
  return rows


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_run_holds_the_logged_rows(watched_run):
  runs = glob.glob(os.path.join(watched_run, "wandb", "offline-run-*", "run-*.wandb"))
  assert len(runs) == 1
  with open(os.path.join(watched_run, metrics_lib.WANDB_ID_FILE)) as f:
    assert f.read().strip() in runs[0]
  logged = {r["_step"]: r for r in _wandb_history(runs[0]) if "loss" in r}
  rows = {r["step"]: r for r in _rows(watched_run)}
  assert sorted(logged) == [2, 4, 6]
  for step, row in logged.items():
    assert row["loss"] == pytest.approx(rows[step]["loss"])
    assert row["goodput"] == pytest.approx(rows[step]["goodput"])


def test_a_wandb_project_without_wandb_is_one_config_error(monkeypatch):
  config = run_helpers.tiny_run_config("ar_baseline.py:size=tiny", "t.model", TINY_VOCAB,
                                       log__wandb_project="p")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(config_lib.ConfigError, match=r"config.log.wandb_project.*\[wandb\]"):
    metrics_lib.check_writers(config)


class _SlowBackend:
  def __init__(self, fail=False, fail_steps=()):
    self.release, self.rows, self.fail, self.fail_steps = threading.Event(), [], fail, fail_steps

  def write(self, step, row):
    self.release.wait(10)
    if self.fail or step in self.fail_steps:
      raise OSError("disk full")
    self.rows.append((step, row))

  def close(self):
    pass


def test_writes_return_before_the_backends_finish_and_errors_surface(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  slow = _SlowBackend()
  writer._backends.append(slow)           # pylint: disable=protected-access
  writer.write(1, {"loss": 2.0})          # returns while the backend still waits
  assert slow.rows == []
  slow.release.set()
  writer.flush()
  assert slow.rows == [(1, {"loss": 2.0})]
  writer.close()
  failing = metrics_lib.MetricsWriter(str(tmp_path / "f"))
  failing._backends.append(_SlowBackend(fail=True))   # pylint: disable=protected-access
  failing._backends[-1].release.set()                 # pylint: disable=protected-access
  failing.write(1, {"loss": 2.0})
  with pytest.raises(errors.UserError, match="Writing metrics failed: disk full"):
    failing.close()


def test_a_failed_row_surfaces_even_when_later_rows_were_queued_after_it(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  once = _SlowBackend(fail_steps=(1,))
  writer._backends.append(once)           # pylint: disable=protected-access
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.0})          # queued behind the row that will fail
  once.release.set()
  with pytest.raises(errors.UserError, match="Writing metrics failed: disk full"):
    writer.close()


def test_flush_raises_a_failed_row_as_a_user_error_even_behind_a_good_one(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  once = _SlowBackend(fail_steps=(1,))
  writer._backends.append(once)           # pylint: disable=protected-access
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.0})          # succeeds after the row that fails
  once.release.set()
  with pytest.raises(errors.UserError, match="Writing metrics failed: disk full"):
    writer.flush()
  writer.flush()                          # reported once
  writer.close()


def test_calm_plot_draws_the_real_run_beside_a_fake_one(watched_run, tmp_path):
  from tests import test_plot  # pylint: disable=g-import-not-at-top
  fake = test_plot._fake_run(str(tmp_path / "calm"), "calm.py:size=tiny", 1.5e6, batch_size=8)  # pylint: disable=protected-access
  output = plot.plot([watched_run, fake], str(tmp_path / "curves.png"), "tokens")
  assert matplotlib.image.imread(output).shape == (850, 1500, 4)
  assert plot.Run(watched_run).train["goodput"].keys() == {2, 4, 6}
