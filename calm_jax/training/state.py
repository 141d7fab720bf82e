"""Where a run's train state comes from: the abstract state and its shardings, a fresh init, or another run's params.

`build` adds the optimizer and the abstract train state to runs.model_parts (the
model and its params); `init_state` initialises it straight into its shardings;
`init_from_params` reads config.init_from=WORKDIR[:STEP] (fine-tuning: another run's
or a converted checkpoint's params, fresh optimizer state).
"""
import logging
import os

import flax.linen as nn
import jax

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax import stages
from calm_jax.parallel import sharding
from calm_jax.training import optimizer
from calm_jax.training import steps as steps_lib


def build(config, mesh, axis_rules, ae_config=None):
  """Model, optimizer, abstract state and shardings, without touching any data.

  ae_config: the stage-1 run's config for a CALM run (default: read from its workdir).
  Returns runs.model_parts' dict with tx, schedule, state_shardings and abstract_state.
  """
  parts = runs.model_parts(config, mesh, axis_rules, ae_config)
  tx, schedule = optimizer.make_optimizer(config.optim, config.train.steps)
  ema_decay = config.train.ema_decay
  state_boxed = jax.eval_shape(lambda p: steps_lib.init_train_state(p, tx, ema_decay),
                               parts["boxed_trainable"])
  return dict(parts, tx=tx, schedule=schedule, ema_decay=ema_decay,
              state_shardings=sharding.tree_shardings(state_boxed, mesh, axis_rules),
              abstract_state=runs.strip_boxes(state_boxed))


def init_state(parts, seed):
  """Trainable params and optimizer state initialised directly into their shardings."""

  def create(rng):
    trainable, _ = runs.split_frozen(nn.unbox(parts["init_params"](rng)))
    return steps_lib.init_train_state(trainable, parts["tx"], parts["ema_decay"])

  return jax.jit(create, out_shardings=parts["state_shardings"])(jax.random.key(seed))


def parse_init_from(value):
  """'WORKDIR[:STEP]' -> (workdir, step or None)."""
  workdir, sep, step = value.rpartition(":")
  if sep and step.isdigit():
    return workdir, int(step)
  return value, None


def _flat_paths(tree, prefix=()):
  for key in sorted(tree):
    if isinstance(tree[key], dict):
      yield from _flat_paths(tree[key], prefix + (key,))
    else:
      yield prefix + (key,), tree[key]


def init_from_params(config, parts):
  """The trainable params of config.init_from (WORKDIR[:STEP]) in this run's shardings."""
  workdir, step = parse_init_from(config.init_from)
  field = f"config.init_from={config.init_from!r}"
  if not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"{field}: {workdir} does not exist; give a calm-train or "
                                 "calm-convert workdir (WORKDIR[:STEP]).")
  source = config_lib.load_config(workdir)
  if not stages.same_stage(source, config):
    raise config_lib.ConfigError(f"{field} is a {source.stage!r} run; this run is "
                                 f"{config.stage!r}: start from a run of the same stage.")
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise checkpoint.CheckpointError(f"{field}: {workdir} has checkpoints {steps}; "
                                       f"step {step} is not among them.")
    step = steps[-1] if step is None else step
    want = {"/".join(p): tuple(s.shape) for p, s in _flat_paths(parts["abstract_params"])}
    have = ckpt.param_shapes(step)
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))
      raise config_lib.ConfigError(
          f"{field}: its params do not fit this model (first differences, path and shape: "
          f"{diff[:4]}); use the same config.model as {workdir}/config.json.")
    abstract = checkpoint.abstract_like(parts["abstract_state"].params,
                                        parts["state_shardings"].params)
    logging.info("Initialising from %s step %d (%s)", workdir, step, field)
    return ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
