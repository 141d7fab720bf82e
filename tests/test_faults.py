"""kill -9 on the default path (issue 14): 5 kills per stage at seeded random moments, then every loss and the final params equal an uninterrupted run's bit for bit.

For each stage (autoencoder, CALM on it, AR) with an empty config.data.tokenizer (a
tokenizer trained into the workdir, or the autoencoder's), one `calm-train` command is
started and killed with SIGKILL KILLS times, each time at a moment drawn from a seeded
RNG: early (while it trains the tokenizer, restores or compiles), a random delay after a
step's metrics row, or while a checkpoint is being written (a temporary step directory
exists); then the same command runs to the end. Every metrics row the killed run ever
logged (steps redone after a kill included) must equal the row of that step of an
uninterrupted run of the same command exactly, and so must the final params.
CALM_KILL_SEED=N replays a sequence. The last test checks that the CALM run uses exactly
the autoencoder it recorded at its first start (issue 14 item 3).

Cost (CI has 2 cores): the uninterrupted runs and the three stages run side by side, and
every run is a process forked by tests/cli_runner.py's server, which imported the command
lines and built the builtin corpus once (~10 s a fresh interpreter spends first, 21 times).
"""
from concurrent import futures
import os
import pathlib
import random
import shutil
import signal
import threading
import time

import jax
import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib
from calm_jax.training import loop
from calm_jax.training import metrics
from tests.test_reliability import (AR, AUTOENCODER, CALM, _checkpoint_names, _complete_steps,
                                    _finish, _rows)
from tests.test_reliability import _overrides as _tiny_overrides

pytestmark = pytest.mark.faults

STAGES = {"autoencoder": AUTOENCODER, "calm": CALM, "ar": AR}
KILLS = 5
STEPS = 24
VOCAB = 400
SEED = int(os.environ.get("CALM_KILL_SEED", random.randrange(1 << 30)))


def _overrides(**extra):
  """The command line's --config flags: test_reliability's tiny AR run on the default path."""
  return _tiny_overrides("", STEPS, 2, data__tokenizer_max_chars=300_000, **extra)


TIMEOUT_S = 600           # per run or wait: a hung run fails the test instead of CI


def _wait(proc, condition, timeout=TIMEOUT_S, required=True):
  """Polls condition() every 5 ms; False if the process ended first (or, not required, timed out)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.005)
  assert not required, f"timed out after {timeout}s (kill seed {SEED})"
  return False


def _kill_once(proc, workdir, rng, kind):
  """Kills proc at a moment of `kind`; returns what it hit."""
  done = max(_complete_steps(workdir), default=0)
  if kind == "early":       # training the tokenizer, restoring or compiling
    time.sleep(rng.uniform(0.05, 2.0))
  else:
    # Past the row of step done + 5 the save of done + 4 has waited for done + 2's commit:
    # every such kill resumes from a newer checkpoint than the last one did.
    target = min(STEPS - 1, done + rng.randint(5, 7))
    logged = len(_rows(workdir))
    ran = _wait(proc, lambda: any(r["step"] >= target for r in _rows(workdir)[logged:]))
    assert ran, f"kill seed {SEED}: the run ended before step {target}: {_finish(proc)[1][-3000:]}"
    if kind == "save":
      _wait(proc, lambda: any(".orbax-checkpoint-tmp" in n for n in _checkpoint_names(workdir)),
            timeout=10, required=False)
    else:
      time.sleep(rng.uniform(0.0, 0.2))
  in_save = any(".orbax-checkpoint-tmp" in n for n in _checkpoint_names(workdir))
  proc.kill()
  rc, log = _finish(proc, TIMEOUT_S)
  assert rc == -signal.SIGKILL, f"kill seed {SEED}, {kind}: exit status {rc}: {log[-3000:]}"
  return (f"{kind}{'+in_save' if in_save else ''}: resumed from {done}, left "
          f"{max(_complete_steps(workdir), default=0)}")


def _start(server, stage, workdir, flags, log):
  return server.start("calm-train", ["--config", STAGES[stage], "--workdir", workdir, *flags], log)


def _run_with_kills(server, stage, workdir, flags, seed):
  """The killed sequence: KILLS starts killed, then one run to the end; returns the kill events."""
  rng = random.Random(seed)
  workdir.mkdir()
  started = []
  try:
    kinds = ["early"] + [rng.choice(["step", "save"]) for _ in range(KILLS - 2)] + ["save"]
    events = []
    for kind in kinds:
      started.append(_start(server, stage, workdir, flags, workdir / "train.log"))
      events.append(_kill_once(started[-1], workdir, rng, kind))
    started.append(_start(server, stage, workdir, flags, workdir / "train.log"))
    rc, log = _finish(started[-1], TIMEOUT_S)
    assert rc == 0, f"kill seed {seed}, {events}: {log[-3000:]}"
  finally:
    for proc in started:            # nothing left running when a check fails
      proc.kill()
  return events


def _final_params_digest(workdir):
  ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
  step = ckpt.all_steps()[-1]
  params = ckpt.manager.restore(step, args=checkpoint.ocp.args.Composite(
      params=checkpoint.ocp.args.StandardRestore())).params
  ckpt.close()
  return step, checkpoint.params_digest(params)


def _assert_bit_identical(killed, straight, events):
  want = {r["step"]: r for r in _rows(straight)}
  assert sorted(want) == list(range(1, STEPS + 1))
  got = _rows(killed)
  for row in got:                       # every row ever logged, redone steps included
    assert row["loss"] == want[row["step"]]["loss"], (SEED, events, row)
    assert row["grad_norm"] == want[row["step"]]["grad_norm"], (SEED, events, row)
  assert {r["step"] for r in got} == set(want)
  assert _final_params_digest(killed) == _final_params_digest(straight)
  assert not any(".orbax-checkpoint-tmp" in n for n in _checkpoint_names(killed))
  assert sum("in_save" in e for e in events) >= 1, (SEED, events)   # a write was cut short
  resumed = {e.split("resumed from ")[1].split(",")[0] for e in events} - {"0"}
  assert len(resumed) >= 2, (SEED, events)          # resumed from several checkpoints


def test_a_row_cut_short_by_a_kill_does_not_swallow_the_next(tmp_path):
  """A kill in the middle of a metrics row: the resumed run's first row is on a line of its own."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert _rows(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def kill_runs(root, fork_server):
  """{stage: (killed workdir, straight workdir, kill events)}.

  The three stages run side by side, each killed sequence beside its uninterrupted run
  (2 CPU cores: one sequence alone leaves one idle); CALM's two start once the uninterrupted
  autoencoder, which both use, has finished.
  """
  ae_finished = threading.Event()
  flags = {stage: _overrides() for stage in STAGES}
  flags["calm"] = _overrides(autoencoder__workdir=root / "autoencoder_straight")

  def straight(stage):
    if stage == "calm":
      ae_finished.wait(TIMEOUT_S)
    try:
      workdir = root / f"{stage}_straight"
      rc, log = _finish(_start(fork_server, stage, workdir, flags[stage], f"{workdir}.log"),
                        TIMEOUT_S)
      assert rc == 0, log[-3000:]
    finally:
      if stage == "autoencoder":
        ae_finished.set()

  def killed(stage, seed):
    if stage == "calm":
      ae_finished.wait(TIMEOUT_S)
    return _run_with_kills(fork_server, stage, root / f"{stage}_killed", flags[stage], seed)

  with futures.ThreadPoolExecutor(2 * len(STAGES)) as pool:
    straights = [pool.submit(straight, stage) for stage in STAGES]
    kills = {stage: pool.submit(killed, stage, SEED + i) for i, stage in enumerate(STAGES)}
    for done in straights:
      done.result()
    return {stage: (root / f"{stage}_killed", root / f"{stage}_straight", kills[stage].result())
            for stage in STAGES}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_survives_kill_9_bit_identically(kill_runs, stage):
  killed, straight, events = kill_runs[stage]
  print(f"kill seed {SEED}: {stage} {events}")
  _assert_bit_identical(killed, straight, events)
  if stage != "calm":                # CALM uses its autoencoder's tokenizer
    assert (killed / runs.WORKDIR_TOKENIZER).exists()


def test_calm_uses_the_autoencoder_it_recorded(root, kill_runs):
  """Item 3: the step and digests recorded at the first start, never a newer or changed one."""
  ae, calm = kill_runs["autoencoder"][1], kill_runs["calm"][0]
  saved = config_lib.load_config(str(calm))
  assert saved.autoencoder.step == STEPS and saved.autoencoder.digest
  assert saved.data.tokenizer == str(ae / runs.WORKDIR_TOKENIZER)
  assert saved.autoencoder.tokenizer_digest == config_lib.load_config(
      str(kill_runs["calm"][1])).autoencoder.tokenizer_digest
  one = jax.devices()[:1]
  ae_ckpt = pathlib.Path(checkpoint.checkpoint_dir(str(ae)))
  shutil.copytree(ae_ckpt / str(STEPS), ae_ckpt / str(STEPS + 2))    # a newer AE checkpoint
  assert runs.open_run(str(calm), devices=one).config.autoencoder.step == STEPS
  (ae_ckpt / str(STEPS)).rename(root / "moved_away")                   # the recorded one gone
  with pytest.raises(checkpoint.CheckpointError, match=rf"autoencoder.step={STEPS} is not"):
    runs.open_run(str(calm), devices=one)
  (root / "moved_away").rename(ae_ckpt / str(STEPS))
  tokenizer = ae / runs.WORKDIR_TOKENIZER
  tokenizer.rename(root / "ae_tokenizer")
  tokenizer_lib.train_tokenizer(sources.iter_texts("builtin:python_docs"), VOCAB, str(tokenizer),
                                max_chars=200_000)                     # another tokenizer there
  with pytest.raises(config_lib.ConfigError, match="tokenizer_digest.*different autoencoder"):
    runs.open_run(str(calm), devices=one)
  # A missing autoencoder tokenizer fails the check (it used to be skipped when the CALM run
  # names its own copy of the tokenizer).
  tokenizer.unlink()
  config = config_lib.load_config_file(f"{pathlib.Path(__file__).parents[1]}/{CALM}")
  for flag in _overrides(autoencoder__workdir=ae, data__tokenizer=root / "ae_tokenizer"):
    name, _, value = flag[len("--config."):].partition("=")
    section, field = name.split(".")
    config[section][field] = type(config[section][field])(value)
  with pytest.raises(config_lib.ConfigError, match="does not exist: the autoencoder's token ids"):
    loop.train_and_evaluate(config, str(root / "calm_new"), one)
