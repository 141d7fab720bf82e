"""What a rerun on an existing workdir may change (issue 14 items 1 and 5): training/resume.py on saved configs.

No training: a workdir here is a saved config.json and empty step directories (the
steps already taken). The end-to-end reruns are in tests/test_faults.py.
"""
import os
import pathlib

import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.training import resume

pytestmark = pytest.mark.unit

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _workdir(tmp_path, config, steps_taken=0, **saved_values):
  """A workdir whose config.json is `config` with saved_values set ('a.b': value)."""
  workdir = str(tmp_path / "w")
  saved = config.copy_and_resolve_references()
  for name, value in saved_values.items():
    section, field = name.split(".")
    saved[section][field] = value
  config_lib.save_config(saved, workdir)
  if steps_taken:
    os.makedirs(os.path.join(checkpoint.checkpoint_dir(workdir), str(steps_taken)))
  return workdir


def _ar(**values):
  config = config_lib.load_config_file(f"{EXPERIMENTS}/ar_baseline.py:size=tiny")
  for name, value in values.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


def test_a_rerun_takes_what_the_first_start_resolved(tmp_path):
  """Item 1: the saved config holds the resolved tokenizer path; the rerun's empty one takes it."""
  config = _ar(data__tokenizer="")
  resolved = os.path.join(str(tmp_path / "w"), runs.WORKDIR_TOKENIZER)
  workdir = _workdir(tmp_path, config, 30, **{"data.tokenizer": resolved})
  assert resume.resume_config(config, workdir).data.tokenizer == resolved
  config.optim.lr = config.optim.lr * 2      # a real change is still refused
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    resume.resume_config(config, workdir)


def test_a_relative_tokenizer_path_equals_the_saved_absolute_one(tmp_path, monkeypatch):
  """Item 1 (paths): the first start saved the tokenizer path absolute; the same relative
  --config.data.tokenizer on the rerun was refused as a change."""
  monkeypatch.chdir(tmp_path)
  config = _ar(data__tokenizer="T.model")
  workdir = _workdir(tmp_path, config, 30, **{"data.tokenizer": str(tmp_path / "T.model")})
  assert resume.resume_config(config, workdir).data.tokenizer == str(tmp_path / "T.model")


def test_a_calm_rerun_keeps_the_recorded_autoencoder(tmp_path):
  """Items 1 and 3: step -1 and empty digests take the recorded ones; an explicit other is refused."""
  config = config_lib.load_config_file(f"{EXPERIMENTS}/calm.py:size=tiny")
  config.autoencoder.workdir = str(tmp_path / "ae")
  workdir = _workdir(tmp_path, config, 10, **{
      "autoencoder.step": 40, "autoencoder.digest": "a" * 64,
      "autoencoder.tokenizer_digest": "b" * 64, "data.tokenizer": "/ae/tokenizer.model"})
  rerun = resume.resume_config(config, workdir)
  assert (rerun.autoencoder.step, rerun.autoencoder.digest, rerun.autoencoder.tokenizer_digest,
          rerun.data.tokenizer) == (40, "a" * 64, "b" * 64, "/ae/tokenizer.model")
  config.autoencoder.step = 60
  with pytest.raises(config_lib.ConfigError, match="autoencoder.step: 40 -> 60"):
    resume.resume_config(config, workdir)


@pytest.mark.parametrize("change, steps_taken, refused", [
    # Item 5: train.steps under a cosine schedule changes the lr of the steps taken.
    (dict(train__steps=2000), 300, "train.steps: 1000 -> 2000"),
    # ... but not while every step taken is inside the warmup.
    (dict(train__steps=2000), 50, None),
    (dict(train__steps=2000, train__allow_config_change=True), 300, r"learning rate of step 10\d"),
    (dict(optim__warmup_steps=50), 300, "optim.warmup_steps"),
    (dict(optim__lr=1e-2, train__allow_config_change=True), 300, "optim.lr"),
    (dict(train__batch_size=32, train__allow_config_change=True), 300, "train.batch_size"),
    (dict(data__seq_len=512, train__allow_config_change=True), 300, "data.seq_len"),
    (dict(train__seed=1, train__allow_config_change=True), 300, "train.seed"),
    (dict(train__ema_decay=0.99, train__allow_config_change=True), 300, "train.ema_decay"),
    # Safe: evaluation, logging, checkpoint cadence.
    (dict(train__log_every=1, train__eval_every=5, eval__batch_size=2,
          checkpoint__every_steps=7), 300, None),
    # Not a trajectory change: refused unless allow_config_change.
    (dict(data__train="jsonl:/other/*.jsonl"), 300, "allow_config_change"),
    (dict(data__train="jsonl:/other/*.jsonl", train__allow_config_change=True), 300, None),
    # Nothing taken yet (killed before the first checkpoint): no trajectory to keep.
    (dict(train__batch_size=32, train__allow_config_change=True), 0, None),
])
def test_resume_refuses_changes_to_the_trajectory_of_steps_taken(tmp_path, change, steps_taken,
                                                                 refused):
  saved = _ar(data__tokenizer="/t.model", optim__schedule="cosine")
  workdir = _workdir(tmp_path, saved, steps_taken)
  config = _ar(data__tokenizer="/t.model", optim__schedule="cosine", **change)
  if refused is None:
    resume.resume_config(config, workdir)
  else:
    with pytest.raises(config_lib.ConfigError, match=refused):
      resume.resume_config(config, workdir)


def test_more_steps_under_a_constant_schedule_resume(tmp_path):
  saved = _ar(data__tokenizer="/t.model", optim__schedule="constant")
  workdir = _workdir(tmp_path, saved, 300)
  assert resume.resume_config(_ar(data__tokenizer="/t.model", train__steps=5000),
                              workdir).train.steps == 5000
