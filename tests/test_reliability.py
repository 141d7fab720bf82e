"""Reliability: half-written and corrupt checkpoints, SIGTERM saves, NaN policies, bad input mid-run.

kill -9 is tests/test_faults.py; bad input at start, through every command line, is
tests/test_bad_inputs.py; both share the helpers here. The SIGTERM tests run calm-train
as a process of its own (forked by the `fork_server` fixture, tests/cli_runner.py) on one
CPU device (JAX_NUM_CPU_DEVICES=1) with the shared persistent compilation cache; the
NaN and mid-run data error tests run in-process on one device, with the model's apply
(or the data iterator) wrapped to inject the fault.
"""
import json
import os
import pathlib
import signal
import subprocess
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import stages
from calm_jax.training import loop
from calm_jax.data import pipeline
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.faults

ROOT = pathlib.Path(__file__).resolve().parents[1]
AR = "experiments/ar_baseline.py:size=tiny"
AUTOENCODER = "experiments/autoencoder.py:size=tiny"
CALM = "experiments/calm.py:size=tiny"
VOCAB = TINY_VOCAB
RUN_TIMEOUT_S = 150                 # per subprocess; a hung run fails the test instead of CI


@pytest.fixture(scope="module")
def tokenizer_path(tiny_tokenizer_path):
  return tiny_tokenizer_path


def _overrides(tokenizer_path, steps, every, **extra):
  values = {"data.tokenizer": tokenizer_path, "data.vocab_size": VOCAB,
            "model.vocab_size": VOCAB, "data.seq_len": 32, "eval.block_len": 32,
            "train.batch_size": 8, "train.steps": steps, "train.log_every": 1,
            "train.eval_every": 0, "checkpoint.every_steps": every}
  values.update({k.replace("__", "."): v for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in values.items()]


def _env():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("CALM_COORDINATOR", "CALM_NUM_PROCESSES", "CALM_PROCESS_ID",
                              "SLURM_", "TPU_", "MEGASCALE_", "OMPI_"))}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("CALM_TEST_COMPILE_CACHE",
                                                      "/tmp/calm_jax_test_compile_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _finish(proc, timeout=RUN_TIMEOUT_S):
  """(exit status, log) of a run the fork_server started; killed if it runs past timeout."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  return proc.returncode, pathlib.Path(proc.log_path).read_text()


def _rows(workdir):
  """The rows of WORKDIR/metrics.jsonl (a row cut short by a kill mid-write is left out)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def _final_per_step(workdir, key="loss"):
  """{step: value} keeping the last row per step (a resumed run rewrites the steps it redoes)."""
  return {r["step"]: r[key] for r in _rows(workdir) if key in r}


def _wait_for_row(proc, workdir, min_step, skip_rows, timeout=RUN_TIMEOUT_S):
  """Waits until a row newer than the first skip_rows has step >= min_step; False if it exited."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    rows = _rows(workdir)[skip_rows:]
    if any(r["step"] >= min_step for r in rows):
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  raise AssertionError(f"no metrics row for step {min_step} in {workdir} after {timeout}s")


def _checkpoint_names(workdir):
  path = pathlib.Path(checkpoint.checkpoint_dir(workdir))
  return sorted(p.name for p in path.iterdir()) if path.exists() else []


def _complete_steps(workdir):
  return sorted(int(n) for n in _checkpoint_names(workdir) if n.isdigit())


# -- kill -9 (the suite: tests/test_faults.py) ----------------------------------------------


def test_partial_checkpoint_is_never_picked(tokenizer_path, tmp_path):
  """A half-written step directory (what a kill mid-save leaves) is ignored and cleaned up."""
  one = jax.devices()[:1]
  loop.train_and_evaluate(_config(tokenizer_path, steps=2, every=2), str(tmp_path), one)
  partial = (pathlib.Path(checkpoint.checkpoint_dir(str(tmp_path)))
             / "4.orbax-checkpoint-tmp-1700000000000000")
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "_METADATA").write_text("{")
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  loop.train_and_evaluate(_config(tokenizer_path, steps=4, every=2), str(tmp_path), one)
  assert _checkpoint_names(str(tmp_path)) == ["2", "4"]   # the partial one was removed
  assert sorted(_final_per_step(str(tmp_path))) == [1, 2, 3, 4]


# -- corrupt checkpoint ----------------------------------------------------------------------


def _config(tokenizer_path, steps, every, **overrides):
  config = config_lib.load_config_file(str(ROOT / AR.split(":")[0]) + ":" + AR.split(":")[1])
  config.data.tokenizer = tokenizer_path
  config.data.vocab_size = config.model.vocab_size = VOCAB
  config.data.seq_len = config.eval.block_len = 32
  config.train.batch_size = 8
  config.train.steps = steps
  config.train.log_every = 1
  config.train.eval_every = 0
  config.checkpoint.every_steps = every
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def test_corrupt_checkpoint_is_named_and_the_previous_one_used(tokenizer_path, tmp_path, caplog):
  one = jax.devices()[:1]
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  loop.train_and_evaluate(_config(tokenizer_path, 6, 2), straight, one)
  loop.train_and_evaluate(_config(tokenizer_path, 4, 2), broken, one)
  assert _complete_steps(broken) == [2, 4]
  # Corrupt step 4's parameters: delete its array data files.
  params = pathlib.Path(checkpoint.checkpoint_dir(broken)) / "4" / "params"
  data_files = [p for p in params.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for p in data_files:
    p.unlink()
  with caplog.at_level("ERROR"):
    loop.train_and_evaluate(_config(tokenizer_path, 6, 2), broken, one)
  named = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
  assert named and os.path.join(checkpoint.checkpoint_dir(broken), "4") in named[0]
  # Resumed from step 2 with step 2's data iterator: steps 3..6 equal the straight run.
  assert _final_per_step(broken) == _final_per_step(straight)
  assert _complete_steps(broken) == [2, 4, 6]
  moved = list(pathlib.Path(checkpoint.checkpoint_dir(broken) + ".broken").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4"]


# -- SIGTERM -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_stop(tokenizer_path, tmp_path, signum,
                                                       fork_server):
  overrides = _overrides(tokenizer_path, steps=500, every=1000)
  proc = fork_server.start("calm-train", ["--config", AR, "--workdir", tmp_path, *overrides],
                           tmp_path / "train.log")
  assert _wait_for_row(proc, tmp_path, 3, skip_rows=0), _finish(proc)[1][-3000:]
  proc.send_signal(signum)
  rc, err = _finish(proc, timeout=60)
  assert rc == 0, err[-3000:]
  saved = _complete_steps(tmp_path)
  assert len(saved) == 1 and 3 <= saved[0] < 500
  assert f"Preempted: saved step {saved[0]}" in err
  assert max(_final_per_step(tmp_path)) == saved[0]
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.all_steps() == saved       # a complete, restorable step
  ckpt.close()


# -- non-finite loss ---------------------------------------------------------------------------


class _NaNWhenTokenSeen:
  """The real model, except that a batch holding `token` gets a NaN loss and NaN gradients."""

  def __init__(self, model, token):
    self._model = model
    self._token = token

  def __getattr__(self, name):            # dtype, config, ...: the real model's
    return getattr(self._model, name)

  def apply(self, variables, batch, **kwargs):
    loss, metrics = self._model.apply(variables, batch, **kwargs)
    poison = jnp.where(jnp.any(batch["tokens"] == self._token), jnp.nan, 1.0)
    loss = loss * poison                   # NaN loss, and NaN gradients through it
    return loss, dict(metrics, loss=loss)


def _poison(monkeypatch, config, bad_batch, num_batches):
  """Wraps the model so that batch `bad_batch` (0-based) is the first non-finite one.

  Returns the 0-based indices of the batches among the first num_batches that are poisoned.
  """
  tok = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  batches = [next(it) for it in [pipeline.make_iterator(config, tok, "train")]
             for _ in range(num_batches)]
  earlier = set(np.unique(np.concatenate([b["tokens"].ravel() for b in batches[:bad_batch]])))
  token = int(next(t for t in np.unique(batches[bad_batch]["tokens"]) if t not in earlier))
  real_build = stages.build_model
  monkeypatch.setattr(stages, "build_model",
                      lambda *a, **k: _NaNWhenTokenSeen(real_build(*a, **k), token))
  return [i for i, b in enumerate(batches) if (b["tokens"] == token).any()]


def test_nan_policy_halt_stops_naming_the_step_and_keeps_the_good_checkpoint(
    tokenizer_path, tmp_path, monkeypatch):
  config = _config(tokenizer_path, steps=6, every=2, train__nan_policy="halt")
  _poison(monkeypatch, config, bad_batch=2, num_batches=6)
  with pytest.raises(loop.TrainingHalted, match=r"at step 3\b.*step 2\)"):
    loop.train_and_evaluate(config, str(tmp_path), jax.devices()[:1])
  assert _complete_steps(tmp_path) == [2]
  rows = _final_per_step(tmp_path)
  assert sorted(rows) == [1, 2, 3] and np.isnan(rows[3]) and np.isfinite(rows[2])


def test_nan_policy_skip_skips_and_counts(tokenizer_path, tmp_path, monkeypatch):
  config = _config(tokenizer_path, steps=6, every=2, train__nan_policy="skip")
  poisoned = _poison(monkeypatch, config, bad_batch=2, num_batches=6)
  loop.train_and_evaluate(config, str(tmp_path), jax.devices()[:1])
  skipped = _final_per_step(tmp_path, "skipped_updates")
  assert [skipped[s] for s in range(1, 7)] == [
      sum(1 for i in poisoned if i < s) for s in range(1, 7)]
  assert skipped[3] == 1
  losses = _final_per_step(tmp_path)
  for s in range(1, 7):                   # the loss is NaN exactly on the poisoned batches
    assert np.isnan(losses[s]) == (s - 1 in poisoned)
  assert _complete_steps(tmp_path) == [2, 4, 6]
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  params = ckpt.manager.restore(6, args=checkpoint.ocp.args.Composite(
      params=checkpoint.ocp.args.StandardRestore())).params
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# -- bad input mid-run ---------------------------------------------------------------------------


class _FailingIterator(grain.DatasetIterator):
  """A grain iterator whose read of batch `fail_at` (0-based) fails as a vanished file would."""

  def __init__(self, inner, fail_at):
    super().__init__(inner)
    self._inner, self._fail_at, self._reads = inner, fail_at, 0

  def __next__(self):
    self._reads += 1
    if self._reads == self._fail_at + 1:
      next(self._inner)                    # the failed read may have moved the real iterator
      raise OSError(2, "No such file or directory", "/data/shard-3.jsonl")
    return next(self._inner)

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def test_data_error_mid_run_saves_the_work_done(tokenizer_path, tmp_path, monkeypatch):
  one = jax.devices()[:1]
  straight, failed = str(tmp_path / "straight"), str(tmp_path / "failed")
  loop.train_and_evaluate(_config(tokenizer_path, 5, 100), straight, one)
  real = pipeline.make_iterator
  monkeypatch.setattr(pipeline, "make_iterator",
                      lambda *a, **k: _FailingIterator(real(*a, **k), fail_at=3))
  with pytest.raises(sources.DataError, match=r"config\.data\.train=.*shard-3\.jsonl"):
    loop.train_and_evaluate(_config(tokenizer_path, 5, 100), failed, one)
  assert _complete_steps(failed) == [3]   # the 3 steps done were saved, not lost
  monkeypatch.setattr(pipeline, "make_iterator", real)
  loop.train_and_evaluate(_config(tokenizer_path, 5, 100), failed, one)
  assert _final_per_step(failed) == _final_per_step(straight)
