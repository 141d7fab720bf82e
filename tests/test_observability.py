"""A tiny run you can watch: profiler trace, step times, data wait and goodput in every logged row."""
import glob
import json
import os

import jax
import pytest

from calm_jax.training import efficiency
from calm_jax.training import loop
from tests import run_helpers
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def watched_run(tiny_tokenizer_path, tmp_path_factory):
  """A 6-step AR run logging every 2 steps, profiling steps 2-4, saving at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("watched"))
  config = run_helpers.tiny_run_config(
      "ar_baseline.py:size=tiny", tiny_tokenizer_path, TINY_VOCAB, train__steps=STEPS,
      train__log_every=2, train__profile_steps=(2, 4), checkpoint__every_steps=3)
  loop.train_and_evaluate(config, workdir, jax.devices()[:1])
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
  assert goodputs == sorted(goodputs)        # start-up weighs less as the run goes on
  with open(os.path.join(watched_run, efficiency.GOODPUT_FILE)) as f:
    ledger = json.load(f)
  assert ledger["step"] == STEPS and sorted(ledger["saved"], key=int) == ["0", "3", "6"]
  assert 0 < ledger["productive_s"] < ledger["wall_s"]
