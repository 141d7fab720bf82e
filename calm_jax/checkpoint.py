"""Thin orbax wrapper: save/restore params, optimizer state and the grain iterator together.

A checkpoint step directory holds three items: `params`, `train_state` (step,
optimizer state, skip counters) and
`data_iter` (the grain iterator state, one file per process). A converted reference
checkpoint (calm-convert) holds `params` only and its workdir has CONVERTED_FILE: it
starts other runs (config.init_from, config.autoencoder.workdir) and is evaluated, never
resumed. Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-write never
leaves a checkpoint that `all_steps` would list (the temporary directories
are removed when the next run starts); a checkpoint that fails to restore is
reported by name, moved to WORKDIR/checkpoints.broken/, and the previous one is used.

Digests: when every process has written a save, process 0 writes DIGEST_FILE (the size
and sha256 of every file of the items) into the still-temporary step directory, in
orbax's background thread, before the rename that commits it: a committed step always
has its digest, and training does not wait for the hashing. Every restore checks the
files of the items it reads against it first (process 0 reads them, every process gets
the verdict), so a checkpoint changed on disk (same size or not) is an error naming the
file, never silently different weights. Both assume what multi-host orbax assumes: one
filesystem shared by all processes. Steps saved before digests existed restore with a
warning.
"""
import functools
import glob
import hashlib
import json
import logging
import os
import re
import time

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import errors
from calm_jax.parallel import distributed

ITEMS = ("params", "train_state", "data_iter")
CONVERTED_FILE = "converted.json"     # provenance of a converted (params-only) workdir
DIGEST_FILE = "calm_digest.json"      # {item/relative/path: {size, sha256}} of a step
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step directories: STEP<suffix>*


class CheckpointError(errors.UserError):
  """No usable checkpoint where one was required."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's files differ from the digest written when it was saved."""


# -- Digests of step directories ------------------------------------------------------------
def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _item_files(step_dir):
  """Relative paths of the files inside the item directories (not orbax's top-level
  bookkeeping, which its commit still updates after the digest is written), sorted."""
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) if root != step_dir for name in names)


def write_step_digest(step_dir):
  """Writes step_dir/DIGEST_FILE (through a temporary file) for the files there now."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _item_files(step_dir)}
  tmp = os.path.join(step_dir, DIGEST_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, DIGEST_FILE))


def _digest_mismatch(step_dir, items):
  """'' when the files of `items` match step_dir's digest (or it has none), else why not."""
  path = os.path.join(step_dir, DIGEST_FILE)
  if not os.path.exists(path):
    logging.warning("%s has no %s (saved before digests existed): restoring it unverified.",
                    step_dir, DIGEST_FILE)
    return ""
  try:
    with open(path) as f:
      want = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{path} is unreadable ({type(e).__name__}: {e})"
  for rel in sorted(r for r in want if r.split(os.sep, 1)[0] in items):
    file_path = os.path.join(step_dir, rel)
    if not os.path.isfile(file_path):
      return f"{file_path} is missing (listed in {DIGEST_FILE})"
    size = os.path.getsize(file_path)
    if size != want[rel]["size"]:
      return f"{file_path} has {size} bytes, {want[rel]['size']} when saved (truncated?)"
    if _sha256(file_path) != want[rel]["sha256"]:
      return f"{file_path} changed on disk since it was saved (sha256 mismatch)"
  return ""


def verify_step(step_dir, items):
  """Raises CheckpointCorruptError unless the files of `items` match the step's digest.

  Process 0 reads the files; every process of a multi-host run gets its verdict.
  """
  def check():
    try:
      return _digest_mismatch(step_dir, items)
    except OSError as e:
      return f"{step_dir} cannot be read ({e})"
  problem = distributed.from_primary("verify_checkpoint", check)
  if problem:
    raise CheckpointCorruptError(problem)


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def saved_steps(workdir):
  """The committed steps of a workdir from its directory listing (no orbax), ascending."""
  directory = checkpoint_dir(workdir)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def is_converted(workdir):
  return os.path.exists(os.path.join(workdir, CONVERTED_FILE))


def _flat_items(tree, prefix=""):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _flat_items(tree[key], f"{prefix}/{key}" if prefix else str(key))
  else:
    yield prefix, tree


def params_digest(params):
  """sha256 over every param's path, dtype, shape and bytes (numpy or jax arrays, any sharding).

  Names a set of weights independently of how they were saved: a converted autoencoder
  and its copy restored from orbax have the same digest.
  """
  h = hashlib.sha256()
  for path, leaf in _flat_items(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{path}|{array.dtype.str}|{list(array.shape)}\n".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the target shardings: orbax restores straight into them."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@functools.cache
def _use_plain_array_writes():
  """On CPU, orbax's replica-parallel save slices every replicated array with a freshly
  compiled op per slice shape (seconds per save); write whole replicas instead."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """CheckpointManager with the item names and options calm_jax uses.

  Saves always go through orbax's async checkpointer, whose commit writes the digest
  (see the module docstring); async_save=False waits for each save before returning.
  """

  def __init__(self, workdir, every_steps=1, keep=None, async_save=True, read_only=False):
    _use_plain_array_writes()
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    self.async_save = async_save
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(
          f"{self.directory} does not exist: {workdir!r} has no checkpoints yet "
          "(train it with calm-train first).")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=not read_only,
        async_options=None if read_only else ocp.AsyncOptions(
            post_finalization_callback=self._write_digest),
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,   # what a killed run left half-written
    )
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
    self._saving = None           # the step whose save is in flight (its commit digests it)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def _write_digest(self):
    """orbax's commit callback (process 0, background thread): digests the step in flight
    in its temporary directory, which orbax renames into place right after."""
    final = os.path.join(self.directory, str(self._saving))
    tmp = glob.glob(glob.escape(final) + _TMP_SUFFIX + "*")
    write_step_digest(max(tmp, key=os.path.getmtime) if tmp else final)   # none: no rename

  def _save(self, step, args, force):
    if not force and not self.manager.should_save(step):
      return False
    self.wait()                               # the previous commit has read self._saving
    self._saving = step
    try:
      started = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    if started and not self.async_save:
      self.wait()
    return started

  def _raise_save_error(self, error):
    """A save that failed writing (an OSError, or tensorstore's error carrying an OS error
    code, e.g. a full disk) is a CheckpointError; anything else re-raises."""
    cause, why = error, None
    while cause is not None and why is None:
      code = re.search(r"os_error_code='?(\d+)", str(cause))
      why = (cause.strerror or str(cause) if isinstance(cause, OSError)
             else os.strerror(int(code.group(1))) if code else None)
      cause = cause.__cause__ or cause.__context__
    if why is None:
      raise error
    raise CheckpointError(
        f"Saving step {self._saving} in {self.directory} failed ({why}); the "
        f"steps saved before ({saved_steps(os.path.dirname(self.directory)) or 'none'}) are "
        "intact. Free disk space (or lower config.checkpoint.keep) and rerun the same command "
        "to resume from the latest of them.") from error

  def save(self, step, params, train_state, data_iter, force=False):
    """Saves if `step` is due (or force); returns whether a save started."""
    return self._save(step, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train_state=ocp.args.StandardSave(train_state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
    ), force)

  def _restore(self, step, **items):
    verify_step(os.path.join(self.directory, str(step)), items)
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def restore(self, step, abstract_params, abstract_train_state, data_iter):
    """Restores params and train state into their shardings, and data_iter in place."""
    out = self._restore(
        step,
        params=ocp.args.StandardRestore(abstract_params),
        train_state=ocp.args.StandardRestore(abstract_train_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter),
    )
    return out.params, out.train_state

  def restore_params(self, step, abstract_params):
    """Params only (no optimizer state): for evaluation and for linking stages.

    A step that cannot be restored (corrupt, truncated, or not this model's) is a
    CheckpointError naming it, the cause and the steps whose params are intact.
    """
    try:
      return self._restore(step, params=ocp.args.StandardRestore(abstract_params)).params
    except Exception as e:  # pylint: disable=broad-except
      intact = [s for s in self.all_steps() if s != step and self._params_intact(s)]
      raise CheckpointError(
          f"Checkpoint {os.path.join(self.directory, str(step))} could not be restored "
          f"({type(e).__name__}: {e}). Steps with intact params: {intact or 'none'}; restore "
          "one of those instead (calm-eval/calm-generate --step, config.autoencoder.step, "
          "config.init_from=WORKDIR:STEP), or retrain.") from e

  def _params_intact(self, step):
    try:
      verify_step(os.path.join(self.directory, str(step)), ("params",))
      return True
    except CheckpointError:
      return False

  def save_params(self, step, params):
    """A params-only checkpoint (calm-convert); returns when it is written."""
    self._save(step, ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    self.wait()

  def param_shapes(self, step):
    """{'a/b/kernel': shape} of the params saved at `step`, from the metadata (no data read)."""
    path = os.path.join(self.directory, str(step), "params")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    shapes = jax.tree.map(lambda m: tuple(m.shape), dict(metadata))
    return dict(_flat_items(shapes))

  def restore_latest_good(self, restore_fn, steps=None):
    """Calls restore_fn(step) on the newest checkpoint that restores; logs the broken ones.

    Returns (step, restore_fn's result), or (None, None) when none restores. The
    broken checkpoints newer than the one that restored are moved to
    WORKDIR/checkpoints.broken/ unless read_only (kept for inspection, out of the
    way of the steps the resumed run saves again); when none restores nothing is moved (a changed
    model cannot restore any of them, which says nothing about the files).
    """
    broken = []
    for step in reversed(steps if steps is not None else self.all_steps()):
      try:
        result = restore_fn(step)
      except Exception as e:  # pylint: disable=broad-except
        logging.error("Checkpoint %s could not be restored (%s: %s); trying the previous one.",
                      os.path.join(self.directory, str(step)), type(e).__name__, e)
        broken.append(step)
        continue
      self._move_broken(broken)
      return step, result
    return None, None

  def _move_broken(self, steps):
    if not steps or self.read_only:
      return
    if jax.process_index() == 0:
      target = self.directory + ".broken"
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.directory, str(step)), dest)
        logging.warning("Moved the broken checkpoint step %d to %s.", step, dest)
    distributed.barrier("move_broken_checkpoints")
    self.manager.reload()

  def wait(self):
    """Returns when the save in flight is committed (a CheckpointError if it failed)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
