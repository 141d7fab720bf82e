"""A run is a workdir: its config, checkpoints, tokenizer and linked autoencoder; opened here for training, eval or sampling.

A CALM run links a stage-1 run (config.autoencoder.workdir/step/digest): its config is
resolved once (`autoencoder_config`) and its params restored into the current mesh
(`restore_frozen`). `model_parts` builds the model, its abstract params and their
shardings without touching data or an optimizer: training adds the optimizer state on
top; `open_run` restores the params only (and the frozen autoencoder), for calm-eval,
calm-generate, calm-diagnose, the quickstart and the benchmarks.
"""
import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import stages
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib
from calm_jax.parallel import sharding

WORKDIR_TOKENIZER = "tokenizer.model"
FROZEN_KEYS = ("autoencoder",)     # params that get no gradient and no optimizer state


def split_frozen(params):
  """{'autoencoder': ..., rest} -> (trainable, frozen)."""
  trainable = {k: v for k, v in params.items() if k not in FROZEN_KEYS}
  frozen = {k: v for k, v in params.items() if k in FROZEN_KEYS}
  return trainable, frozen


def strip_boxes(tree):
  """Removes the logical-axis boxes without applying sharding constraints (abstract trees)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# -- The linked autoencoder -----------------------------------------------------------------
def autoencoder_config(config):
  """The resolved config of the stage-1 run that `config.autoencoder.workdir` names.

  Also checks, from the directory listing, that the step to use is there (before anything
  is built).
  """
  ae_workdir = config.autoencoder.workdir
  if not os.path.isdir(ae_workdir):
    raise config_lib.ConfigError(
        f"config.autoencoder.workdir={ae_workdir!r} does not exist; point it at a finished "
        "calm-train run of experiments/autoencoder.py.")
  ae_config = config_lib.load_config(ae_workdir)
  stages.check_autoencoder_compatible(config, ae_config, ae_workdir)
  _autoencoder_step(config, checkpoint.saved_steps(ae_workdir))
  return ae_config


def _autoencoder_step(config, steps):
  """The step to use among the stage-1 run's `steps` (config.autoencoder.step, -1 = latest)."""
  if not steps:
    raise checkpoint.CheckpointError(
        f"config.autoencoder.workdir={config.autoencoder.workdir!r} has no checkpoint; "
        "let its calm-train run finish (or save one) first.")
  step = config.autoencoder.step
  if step != -1 and step not in steps:
    raise checkpoint.CheckpointError(
        f"config.autoencoder.step={step} is not among the checkpoints of "
        f"{config.autoencoder.workdir} ({steps}): this CALM run was made with that step; "
        "restore it, or point config.autoencoder.workdir at a copy that has it.")
  return steps[-1] if step == -1 else step


def autoencoder_step(config):
  """(Checkpointer, step) of the stage-1 run to use (config.autoencoder.step, -1 = latest)."""
  has_dir = os.path.isdir(checkpoint.checkpoint_dir(config.autoencoder.workdir))
  ckpt = checkpoint.Checkpointer(config.autoencoder.workdir, read_only=True) if has_dir else None
  return ckpt, _autoencoder_step(config, ckpt.all_steps() if ckpt else [])


def _tokenizer_digest(config, ae_config):
  """The digest of the autoencoder's tokenizer, which must be the one this run uses too."""
  digests = {}
  for path, whose in ((ae_config.data.tokenizer, f"the autoencoder's ({config.autoencoder.workdir}"
                       f"/{config_lib.CONFIG_FILE}: config.data.tokenizer)"),
                      (config.data.tokenizer, "this run's config.data.tokenizer")):
    if path and not os.path.exists(path):
      raise config_lib.ConfigError(
          f"The tokenizer {path!r}, {whose}, does not exist: the autoencoder's token ids cannot "
          "be checked. Restore the file, or point config.autoencoder.workdir at a run whose "
          "tokenizer is there.")
    if path:
      digests[path] = tokenizer_lib.digest(path)
  if len(set(digests.values())) > 1:
    raise config_lib.ConfigError(
        f"config.data.tokenizer={config.data.tokenizer!r} differs from the autoencoder's "
        f"tokenizer {ae_config.data.tokenizer!r}; leave config.data.tokenizer empty to use the "
        "autoencoder's.")
  return digests[ae_config.data.tokenizer]


def _check_or_record(config, field, value, what):
  """config.autoencoder.<field> := value at the first start; afterwards it must stay equal."""
  recorded = config.autoencoder[field]
  if recorded and recorded != value:
    raise config_lib.ConfigError(
        f"{what} has {field} {value[:16]}..., but config.autoencoder.{field}="
        f"{recorded[:16]}... (recorded at this run's first start) names another: this CALM run "
        "was made with a different autoencoder. Point config.autoencoder.workdir/step at that "
        "one; a CALM run never switches autoencoders.")
  config.autoencoder[field] = value


def restore_frozen(config, parts):
  """The stage-1 autoencoder's params, restored into this mesh's shardings ({} without one).

  The step, params digest and tokenizer digest (config.autoencoder.step/digest/
  tokenizer_digest) are recorded into `config` when unset (the first start of a CALM
  run, which saves them) and must match when set: a resumed, evaluated or sampled CALM
  run uses exactly the autoencoder it was trained with, or fails naming what changed.
  """
  if not parts["abstract_frozen"]:
    return {}
  ae_config = parts["ae_config"]
  tokenizer_digest = _tokenizer_digest(config, ae_config)
  ckpt, step = autoencoder_step(config)
  abstract = checkpoint.abstract_like(parts["abstract_frozen"]["autoencoder"],
                                      parts["frozen_shardings"]["autoencoder"])
  logging.info("Restoring the frozen autoencoder from %s step %d", ckpt.directory, step)
  try:
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  where = f"The autoencoder in {config.autoencoder.workdir}"
  _check_or_record(config, "digest", checkpoint.params_digest(params), f"{where} step {step}")
  _check_or_record(config, "tokenizer_digest", tokenizer_digest, f"{where}'s tokenizer")
  config.autoencoder.step = step
  return {"autoencoder": params}


# -- The tokenizer --------------------------------------------------------------------------
def _workdir_tokenizer_path(workdir):
  return os.path.join(os.path.abspath(workdir), WORKDIR_TOKENIZER)


def default_tokenizer_path(config, workdir, ae_config=None):
  """Where an empty config.data.tokenizer points: a CALM run's autoencoder tokenizer
  (ae_config: its resolved config), otherwise WORKDIR/tokenizer.model."""
  if stages.get(config).needs_autoencoder:
    ae_tokenizer = (ae_config or autoencoder_config(config)).data.tokenizer
    if ae_tokenizer:
      return ae_tokenizer
  return _workdir_tokenizer_path(workdir)


def resolve_tokenizer(config, workdir, is_primary, wait_for_primary, ae_config=None):
  """Sets config.data.tokenizer to a concrete path and returns the loaded tokenizer.

  The path is a SentencePiece .model, or a Hugging Face tokenizer.json or directory
  holding one (tokenizer.load). Empty means: for a CALM run, the autoencoder's tokenizer
  (ae_config: its resolved config); otherwise one trained from config.data.train into
  WORKDIR/tokenizer.model (reused when it exists). A CALM run's tokenizer is checked
  against its autoencoder's in restore_frozen.
  """
  path = config.data.tokenizer
  if not path:
    path = default_tokenizer_path(config, workdir, ae_config)
  if not config.data.tokenizer and path == _workdir_tokenizer_path(workdir):
    if is_primary and not os.path.exists(path):
      logging.info("Training a %d-piece tokenizer on %s into %s",
                   config.data.vocab_size, config.data.train, path)
      tokenizer_lib.train_tokenizer(
          sources.iter_texts(config.data.train, config.data.max_bad_fraction),
          vocab_size=config.data.vocab_size, output_path=path,
          model_type=config.data.tokenizer_type, max_chars=config.data.tokenizer_max_chars)
    wait_for_primary("tokenizer")
  tok = tokenizer_lib.load(path)
  if tok.vocab_size != config.model.vocab_size:
    raise config_lib.ConfigError(
        f"The tokenizer {path} has {tok.vocab_size} pieces but config.model.vocab_size="
        f"{config.model.vocab_size}; pass --config.data.vocab_size={tok.vocab_size} "
        f"--config.model.vocab_size={tok.vocab_size} or another tokenizer.")
  config.data.tokenizer = os.path.abspath(path)
  return tok


# -- The model, its abstract params and their shardings -------------------------------------
def _dummy_batch(num_rows, seq_len):
  return {"tokens": jnp.zeros((num_rows, seq_len), jnp.int32),
          "mask": jnp.ones((num_rows, seq_len), jnp.int32)}


def model_parts(config, mesh, axis_rules, ae_config=None):
  """The model and its abstract params and shardings, split into trainable and frozen.

  ae_config: the stage-1 run's config for a CALM run (default: read from its workdir, once).
  Returns a dict: model, ae_config, init_params(rng) -> boxed params, boxed_trainable,
  boxed_frozen (LogicallyPartitioned ShapeDtypeStructs), param_shardings, frozen_shardings,
  abstract_params, abstract_frozen (plain ShapeDtypeStructs).
  """
  if stages.get(config).needs_autoencoder and ae_config is None:
    ae_config = autoencoder_config(config)
  model = stages.build_model(config, ae_model_config=ae_config.model if ae_config else None)
  dummy = _dummy_batch(sharding.batch_shards(mesh, axis_rules), config.data.seq_len)

  def init_params(rng):
    r = jax.random.split(rng, 3)
    return model.init({"params": r[0], "dropout": r[1], "sample": r[2]}, dummy,
                      train=False)["params"]

  trainable, frozen = split_frozen(jax.eval_shape(init_params, jax.random.key(0)))
  return dict(
      model=model, ae_config=ae_config, init_params=init_params,
      boxed_trainable=trainable, boxed_frozen=frozen,
      param_shardings=sharding.tree_shardings(trainable, mesh, axis_rules),
      frozen_shardings=sharding.tree_shardings(frozen, mesh, axis_rules),
      abstract_params=strip_boxes(trainable), abstract_frozen=strip_boxes(frozen))


# -- A run opened for eval or sampling ------------------------------------------------------
@dataclasses.dataclass
class Run:
  """A restored run: everything eval and generation need (params only, no optimizer state)."""
  workdir: str
  config: Any              # the resolved config.json
  ae_config: Any           # the stage-1 run's config for CALM, else None
  model: Any               # the flax module (stages.build_model)
  params: Any              # {trainable..., 'autoencoder': frozen} on the mesh
  param_shardings: Any     # NamedShardings of `params`
  mesh: Any
  axis_rules: Any
  tokenizer: Any
  step: int
  abstract_params: Any     # trainable params' ShapeDtypeStructs with shardings (restore_step)


def checkpoint_steps(workdir):
  """The saved steps of a run, ascending (CheckpointError if there are none)."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps:
    raise checkpoint.CheckpointError(
        f"{checkpoint.checkpoint_dir(workdir)} holds no checkpoint; train the run first.")
  return steps


def _restore_params(workdir, step, abstract):
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()


def open_run(workdir, step=None, devices=None, fill_config=None):
  """Restores WORKDIR's params at `step` (None: the latest) into a mesh over `devices`.

  The mesh comes from the saved config.mesh (data=-1 absorbs whatever devices are
  here), so a run trained on 8 devices restores onto 1 and vice versa. fill_config:
  a function that completes an older config.json (cli.inference_defaults).
  """
  config = config_lib.load_config(workdir).copy_and_resolve_references()
  if fill_config is not None:
    config = fill_config(config)
  steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise checkpoint.CheckpointError(f"{workdir} has no checkpoint at step {step} (it has {steps}).")
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  with sharding.activate(mesh, axis_rules):
    parts = model_parts(config, mesh, axis_rules)
    abstract = checkpoint.abstract_like(parts["abstract_params"], parts["param_shardings"])
    params = _restore_params(workdir, step, abstract)
    frozen = restore_frozen(config, parts)
  logging.info("Restored %s step %d (%s)", workdir, step, config.stage)
  return Run(workdir=workdir, config=config, ae_config=parts["ae_config"], model=parts["model"],
             params={**params, **frozen},
             param_shardings={**parts["param_shardings"], **parts["frozen_shardings"]},
             mesh=mesh, axis_rules=axis_rules, tokenizer=tokenizer, step=step,
             abstract_params=abstract)


def restore_step(run, step):
  """The same run at another checkpoint step (params replaced in place; frozen params kept)."""
  params = _restore_params(run.workdir, step, run.abstract_params)
  frozen = {k: v for k, v in run.params.items() if k not in params}
  run.params = {**params, **frozen}
  run.step = step
  return run
