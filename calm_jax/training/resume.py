"""What a rerun on an existing workdir may change: it takes the saved resolutions, allows the safe changes, refuses the rest.

A rerun of the same command leaves the fields resolved at the first start unset
(config.RESOLVED_AT_START: an empty data.tokenizer, autoencoder.step -1, ...): they
take the saved values, so the rerun compares equal and uses exactly what the first
start used. Then each field that differs from the saved config is one of:

  safe         config.RESUMABLE_FIELDS (logging, eval, checkpoint cadence), and
               train.steps when the learning rate of every step already taken stays
               the same (a constant schedule, or all steps taken within the warmup);
  trajectory   a change that would have made the steps already taken different:
               train.batch_size, train.grad_accum_steps, data.seq_len, train.seed,
               train.ema_decay (the params' average saved), and
               train.steps / optim.* when they change the learning rate of a step taken.
               Always refused: continuing would give a run that no single config makes.
               The fix: a new --workdir with config.init_from=WORKDIR;
  other        refused unless config.train.allow_config_change=True (then logged).
"""
import logging
import os

import numpy as np

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax.training import optimizer

TRAJECTORY_FIELDS = ("train.batch_size", "train.grad_accum_steps", "data.seq_len", "train.seed",
                     "train.ema_decay")      # the saved average (and its checkpoint tree)
SCHEDULE_FIELDS = ("train.steps", "optim.lr", "optim.warmup_steps", "optim.schedule",
                   "optim.min_lr_ratio")


def _lr_changed_at(saved, config, steps_taken):
  """The first step < steps_taken whose learning rate differs between the configs, or None."""
  if not steps_taken:
    return None
  steps = np.arange(steps_taken)
  old = np.asarray(optimizer.learning_rate_schedule(saved.optim, saved.train.steps)(steps))
  new = np.asarray(optimizer.learning_rate_schedule(config.optim, config.train.steps)(steps))
  differ = np.flatnonzero(old != new)
  return int(differ[0]) if differ.size else None


def _classify(changes, saved, config, steps_taken):
  """(trajectory, other) changes; the safe ones are left out."""
  lr_step = _lr_changed_at(saved, config, steps_taken)
  trajectory, other = [], []
  for change in changes:
    name = change[0]
    if name in SCHEDULE_FIELDS and lr_step is not None:
      trajectory.append(change)
    elif name in TRAJECTORY_FIELDS and steps_taken:
      trajectory.append(change)
    elif name != "train.steps":
      other.append(change)
  return trajectory, other, lr_step


def _describe(changes):
  return "; ".join(f"{n}: {a!r} -> {b!r}" for n, a, b in changes[:8])


def resume_config(config, workdir):
  """The config to run `workdir` with (see the module docstring); raises ConfigError to refuse.

  Also refuses a converted workdir (params only: never resumed).
  """
  if checkpoint.is_converted(workdir):
    raise checkpoint.CheckpointError(
        f"{workdir} is a converted checkpoint (calm-convert: params only, no optimizer state or "
        f"data position) and is not resumed; fine-tune it in a new --workdir with "
        f"--config.init_from={workdir}.")
  config_lib.absolute_paths(config)
  if not os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    return config
  saved = config_lib.load_config(workdir)
  config = config_lib.with_saved_resolutions(config, saved)
  changes = config_lib.config_changes(saved, config)
  steps_taken = max(checkpoint.saved_steps(workdir), default=0)
  trajectory, other, lr_step = _classify(changes, saved, config, steps_taken)
  if trajectory:
    why = (f"the learning rate of step {lr_step + 1} would change" if lr_step is not None
           else "they decide what those steps computed")
    raise config_lib.ConfigError(
        f"{workdir} has taken {steps_taken} steps with its saved config, and this rerun changes "
        f"{_describe(trajectory)}: {why}. Rerun with the saved values, or continue from its "
        f"params with the new values in a new --workdir with --config.init_from={workdir}.")
  if other and not config.train.allow_config_change:
    raise config_lib.ConfigError(
        f"{workdir} was created by a different config ({_describe(other)}). Use a new "
        "--workdir, or pass --config.train.allow_config_change=True to resume with the new "
        "values.")
  if other:
    logging.warning("Resuming %s with a changed config (allow_config_change): %s", workdir,
                    _describe(other))
  return config
