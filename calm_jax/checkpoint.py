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
"""
import functools
import hashlib
import logging
import os
import time

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import errors

ITEMS = ("params", "train_state", "data_iter")
CONVERTED_FILE = "converted.json"     # provenance of a converted (params-only) workdir


class CheckpointError(errors.UserError):
  """No usable checkpoint where one was required."""


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


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
  """CheckpointManager with the item names and options calm_jax uses."""

  def __init__(self, workdir, every_steps=1, keep=None, async_save=True, read_only=False):
    _use_plain_array_writes()
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(
          f"{self.directory} does not exist: {workdir!r} has no checkpoints yet "
          "(train it with calm-train first).")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=async_save and not read_only,
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,   # what a killed run left half-written
    )
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step, params, train_state, data_iter, force=False):
    """Saves if `step` is due (or force); returns whether a save started."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train_state=ocp.args.StandardSave(train_state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
    )
    return self.manager.save(step, args=args, force=force)

  def _restore(self, step, **items):
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
    """Params only (no optimizer state): for evaluation and for linking stages."""
    return self._restore(step, params=ocp.args.StandardRestore(abstract_params)).params

  def save_params(self, step, params):
    """A params-only checkpoint (calm-convert); returns when it is written."""
    self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                      force=True)
    self.manager.wait_until_finished()

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
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("calm_jax:move_broken_checkpoints")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
