"""Restore a trained run for inference: its saved config, tokenizer and params only, into the current mesh.

Shared by calm-eval and calm-generate. Reuses the trainer's `build` (model,
abstract params and shardings) and the Checkpointer's params-only restore, so
no optimizer state is read. For a CALM run the frozen autoencoder comes from
config.autoencoder.workdir exactly as in training.
"""
import dataclasses
import logging
from typing import Any

from calm_jax import checkpoint
from calm_jax import config_lib
from calm_jax import sharding
from calm_jax import train
from calm_jax.data import tokenizer as tokenizer_lib
from experiments import common

# Sections read by eval/generation that runs saved before they existed may lack:
# missing fields are filled from experiments/common.py (the single home of defaults).
_INFERENCE_SECTIONS = {"eval": common.eval_config, "sampling": common.sampling_config}


@dataclasses.dataclass
class Run:
  """A restored run: everything eval and generation need."""
  workdir: str
  config: Any              # the resolved config.json (+ current eval/sampling defaults)
  ae_config: Any           # the stage-1 run's config for CALM, else None
  model: Any               # the flax module (build_model)
  params: Any              # {trainable..., 'autoencoder': frozen} on the mesh
  param_shardings: Any     # NamedShardings of `params`
  mesh: Any
  axis_rules: Any
  tokenizer: Any
  step: int
  abstract_params: Any     # trainable params' ShapeDtypeStructs with shardings (restore_step)


def with_inference_defaults(config):
  """Adds eval/sampling fields missing from an older config.json (values from experiments/common.py)."""
  config = config.copy_and_resolve_references()
  for section, make in _INFERENCE_SECTIONS.items():
    defaults = make()
    if section not in config:
      config[section] = defaults
      continue
    for key, value in defaults.items():
      if key not in config[section]:
        config[section][key] = value
  return config


def checkpoint_steps(workdir):
  """The saved steps of a run, ascending (CheckpointError if there are none)."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps:
    raise checkpoint.CheckpointError(
        f"{checkpoint.checkpoint_dir(workdir)} holds no checkpoint; train the run first.")
  return steps


def load_run(workdir, step=None, devices=None):
  """Restores WORKDIR's params at `step` (None: the latest) into a mesh over `devices`.

  The mesh comes from the saved config.mesh (data=-1 absorbs whatever devices are
  here), so a run trained on 8 devices restores onto 1 and vice versa.
  """
  config = with_inference_defaults(config_lib.load_config(workdir))
  steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise checkpoint.CheckpointError(f"{workdir} has no checkpoint at step {step} (it has {steps}).")
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  with sharding.activate(mesh, axis_rules):
    parts = train.build(config, mesh, axis_rules)
    param_shardings = parts["state_shardings"].params
    abstract = checkpoint.abstract_like(parts["abstract_state"].params, param_shardings)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
      params = ckpt.restore_params(step, abstract)
    finally:
      ckpt.close()
    frozen = train.restore_frozen(config, parts)
  logging.info("Restored %s step %d (%s)", workdir, step, config.stage)
  params = {**params, **frozen}
  shardings = {**param_shardings, **parts["frozen_shardings"]}
  return Run(workdir=workdir, config=config, ae_config=parts["ae_config"], model=parts["model"],
             params=params, param_shardings=shardings, mesh=mesh, axis_rules=axis_rules,
             tokenizer=tokenizer, step=step, abstract_params=abstract)


def restore_step(run, step):
  """The same run at another checkpoint step (params replaced in place; frozen params kept)."""
  ckpt = checkpoint.Checkpointer(run.workdir, read_only=True)
  try:
    params = ckpt.restore_params(step, run.abstract_params)
  finally:
    ckpt.close()
  frozen = {k: v for k, v in run.params.items() if k not in params}
  run.params = {**params, **frozen}
  run.step = step
  return run
