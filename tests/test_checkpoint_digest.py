"""Checkpoint digests (issue 14 items 7, 8): a same-size corruption or a truncation is caught on restore.

Training resume falls back to the newest intact checkpoint; a params-only restore
(calm-eval, the stage-2 autoencoder link, init_from) names the bad step and the
intact ones. The digest's own logic is also checked on a directory made here, and
that writing it does not hold up the training thread.
"""
import contextlib
import errno
import json
import os
import pathlib
import resource
import signal
import threading

import grain
import jax
import jax.numpy as jnp
import pytest

from calm_jax import checkpoint
from calm_jax import runs
from calm_jax.training import loop
from tests.test_reliability import _config, _complete_steps, _final_per_step

pytestmark = pytest.mark.faults


def _data_files(workdir, step, item="params"):
  root = pathlib.Path(checkpoint.checkpoint_dir(workdir)) / str(step) / item
  return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name == "d")


def _flip_bytes(path):
  """Changes bytes in the middle of a file, keeping its size (a silent disk corruption)."""
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  for i in range(mid, min(mid + 8, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_digest_names_the_changed_missing_and_truncated_file(tmp_path):
  step = tmp_path / "7"
  (step / "params" / "d").mkdir(parents=True)
  (step / "params" / "d" / "a").write_bytes(b"x" * 100)
  (step / "train_state").mkdir()
  (step / "train_state" / "b").write_bytes(b"y" * 10)
  (step / "_CHECKPOINT_METADATA").write_text("{}")     # orbax's: updated after the digest
  checkpoint.verify_step(str(step), ("params",))        # no digest yet: a warning only
  checkpoint.write_step_digest(str(step))
  assert set(json.loads((step / checkpoint.DIGEST_FILE).read_text())["files"]) == {
      "params/d/a", "train_state/b"}
  (step / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 1}')
  checkpoint.verify_step(str(step), ("params",))
  (step / "train_state" / "b").write_bytes(b"z" * 10)      # not an item a params restore reads
  checkpoint.verify_step(str(step), ("params",))
  with pytest.raises(checkpoint.CheckpointCorruptError, match="train_state/b changed on disk"):
    checkpoint.verify_step(str(step), ("params", "train_state"))
  (step / "params" / "d" / "a").write_bytes(b"x" * 99 + b"!")
  with pytest.raises(checkpoint.CheckpointCorruptError, match="params/d/a changed on disk"):
    checkpoint.verify_step(str(step), ("params",))
  (step / "params" / "d" / "a").write_bytes(b"x" * 50)
  with pytest.raises(checkpoint.CheckpointCorruptError, match="50 bytes, 100 when saved"):
    checkpoint.verify_step(str(step), ("params",))
  (step / "params" / "d" / "a").unlink()
  with pytest.raises(checkpoint.CheckpointCorruptError, match="params/d/a is missing"):
    checkpoint.verify_step(str(step), ("params",))


def test_the_digest_is_written_in_the_background_before_the_commit(tmp_path, monkeypatch):
  """save() returns while the digest is still being written; the step appears with it."""
  real = checkpoint.write_step_digest
  released, seen = threading.Event(), []

  def held_digest(step_dir):
    seen.append((os.path.basename(step_dir), released.wait(timeout=60)))
    real(step_dir)

  monkeypatch.setattr(checkpoint, "write_step_digest", held_digest)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  it = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt.save(1, {"w": jnp.ones(8)}, {"step": jnp.array(1)}, it, force=True)
  released.set()                  # save() returned with the digest still held
  ckpt.close()
  (name, released_by_us), = seen
  assert released_by_us                                   # it did not wait for the digest
  assert name.startswith("1" + checkpoint._TMP_SUFFIX)   # written before the rename
  assert os.path.exists(os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), "1",
                                     checkpoint.DIGEST_FILE))


def test_same_size_corruption_falls_back_on_resume_and_is_named_by_eval(
    tiny_tokenizer_path, tmp_path, caplog):
  one = jax.devices()[:1]
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 6, 2), straight, one)
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), broken, one)
  for step in (2, 4):
    assert os.path.exists(os.path.join(checkpoint.checkpoint_dir(broken), str(step),
                                       checkpoint.DIGEST_FILE))
  files = _data_files(broken, 4)
  assert files
  for p in files:
    _flip_bytes(p)

  # An explicit eval of the corrupt step names it, the cause and the intact step.
  with pytest.raises(checkpoint.CheckpointError) as err:
    runs.open_run(broken, 4, devices=one)
  message = str(err.value)
  assert os.path.join(checkpoint.checkpoint_dir(broken), "4") in message
  assert "changed on disk" in message and "intact params: [2]" in message

  # Resume skips it (named in the log) and continues from step 2 bit-identically.
  with caplog.at_level("ERROR"):
    loop.train_and_evaluate(_config(tiny_tokenizer_path, 6, 2), broken, one)
  named = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
  assert named and "CheckpointCorruptError" in named[0] and "changed on disk" in named[0]
  assert _final_per_step(broken) == _final_per_step(straight)
  assert _complete_steps(broken) == [2, 4, 6]


def test_truncated_checkpoint_is_a_named_error_for_eval(tiny_tokenizer_path, tmp_path):
  """calm-eval of the latest step (and the stage-2 link, init_from: the same restore_params)
  on a truncated file is a CheckpointError naming the file and the intact steps, no traceback."""
  one = jax.devices()[:1]
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 2, 2), workdir, one)
  path = _data_files(workdir, 2)[0]
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"bytes, \d+ when saved \(truncated\?\).*intact params: none"):
    runs.open_run(workdir, devices=one)


@contextlib.contextmanager
def _file_size_limit():
  """Yields limit(bytes): from then on no file grows past that many bytes (EFBIG, as a full
  disk fails a write), until the block ends."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill
  try:
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_save_that_cannot_be_written_keeps_the_checkpoints_before(tiny_tokenizer_path,
                                                                    tmp_path, monkeypatch):
  """Issue 14 item 9: a save that fails writing is one error naming the intact steps, and
  the steps saved before stay as they were (their digests verify); the rerun resumes.

  Two failures: tensorstore cannot write the arrays (a file size limit set when step 4's
  save starts: the error it reports for a full disk too), and the save's last write, the
  digest, fails with ENOSPC.
  """
  one = jax.devices()[:1]
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 2, 2), workdir, one)
  step_2 = os.path.join(checkpoint.checkpoint_dir(workdir), "2")
  digest = pathlib.Path(step_2, checkpoint.DIGEST_FILE).read_text()

  real_save = checkpoint.Checkpointer.save
  with _file_size_limit() as limit:
    def save_past_the_limit(self, step, *args, **kwargs):
      if step == 4:
        limit(64 << 10)           # the arrays' files are larger; metrics.jsonl is not
      return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_past_the_limit)
    with pytest.raises(checkpoint.CheckpointError, match=r"Saving step 4 .*\(File too large\)"
                       r".*steps saved before \(\[2\]\) are intact"):
      loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), workdir, one)
  monkeypatch.undo()

  def disk_full(step_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step_dir)

  monkeypatch.setattr(checkpoint, "write_step_digest", disk_full)   # the save's last write
  with pytest.raises(checkpoint.CheckpointError, match=r"Saving step 4 .*No space left on device"
                     r".*steps saved before \(\[2\]\) are intact"):
    loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), workdir, one)
  monkeypatch.undo()
  assert checkpoint.saved_steps(workdir) == [2]
  assert pathlib.Path(step_2, checkpoint.DIGEST_FILE).read_text() == digest
  checkpoint.verify_step(step_2, checkpoint.ITEMS)             # its files are as saved
  loop.train_and_evaluate(_config(tiny_tokenizer_path, 4, 2), workdir, one)   # resumes from 2
  assert checkpoint.saved_steps(workdir) == [2, 4]
