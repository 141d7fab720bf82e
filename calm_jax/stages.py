"""What links the stages: the tokenizer a run uses and the frozen autoencoder of a CALM run."""
import logging
import os

from calm_jax import checkpoint
from calm_jax import config_lib
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib

WORKDIR_TOKENIZER = "tokenizer.model"


def autoencoder_config(config):
  """The resolved config of the stage-1 run that `config.autoencoder.workdir` names."""
  ae_workdir = config.autoencoder.workdir
  if not os.path.isdir(ae_workdir):
    raise config_lib.ConfigError(
        f"config.autoencoder.workdir={ae_workdir!r} does not exist; point it at a finished "
        "calm-train run of experiments/autoencoder.py.")
  ae_config = config_lib.load_config(ae_workdir)
  config_lib.check_autoencoder_compatible(config, ae_config, ae_workdir)
  return ae_config


def autoencoder_step(config):
  """The checkpoint step of the stage-1 run to use (config.autoencoder.step, -1 = latest)."""
  has_dir = os.path.isdir(checkpoint.checkpoint_dir(config.autoencoder.workdir))
  ckpt = checkpoint.Checkpointer(config.autoencoder.workdir, read_only=True) if has_dir else None
  steps = ckpt.all_steps() if ckpt else []
  if not steps:
    raise checkpoint.CheckpointError(
        f"config.autoencoder.workdir={config.autoencoder.workdir!r} has no checkpoint; "
        "let its calm-train run finish (or save one) first.")
  step = config.autoencoder.step
  if step == -1:
    step = steps[-1]
  elif step not in steps:
    raise checkpoint.CheckpointError(
        f"config.autoencoder.step={step} is not among the checkpoints of "
        f"{config.autoencoder.workdir} ({steps}).")
  return ckpt, step


def resolve_tokenizer(config, workdir, is_primary, wait_for_primary):
  """Sets config.data.tokenizer to a concrete path and returns the loaded tokenizer.

  The path is a SentencePiece .model, or a Hugging Face tokenizer.json or directory
  holding one (tokenizer.load).

  Empty means: for a CALM run, the autoencoder's tokenizer; otherwise one trained
  from config.data.train into WORKDIR/tokenizer.model (reused when it exists).
  """
  path = config.data.tokenizer
  if config.stage == "calm":
    ae_tokenizer = autoencoder_config(config).data.tokenizer
    if not path:
      path = ae_tokenizer
    elif os.path.exists(path) and os.path.exists(ae_tokenizer) and (
        tokenizer_lib.digest(path) != tokenizer_lib.digest(ae_tokenizer)):
      raise config_lib.ConfigError(
          f"config.data.tokenizer={path!r} differs from the autoencoder's tokenizer "
          f"{ae_tokenizer!r}; leave config.data.tokenizer empty to use the autoencoder's.")
  if not path:
    path = os.path.join(os.path.abspath(workdir), WORKDIR_TOKENIZER)
    if is_primary and not os.path.exists(path):
      logging.info("Training a %d-piece tokenizer on %s into %s",
                   config.data.vocab_size, config.data.train, path)
      tokenizer_lib.train_tokenizer(
          sources.iter_texts(config.data.train, skip_bad_records=config.data.skip_bad_records),
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
