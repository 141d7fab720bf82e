"""Model zoo: build_model(config) returns the linen module of config.stage."""
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
  """The compute dtype named by config.train.compute_dtype (params stay float32)."""
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.train.compute_dtype={config.train.compute_dtype!r}; "
                     f"use one of {sorted(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[config.train.compute_dtype]


def build_model(config, ae_model_config=None):
  """'autoencoder' -> Autoencoder, 'ar' -> ARLanguageModel, 'calm' -> CALM.

  ae_model_config: the stage-1 run's config.model, required for 'calm'.
  """
  dtype = compute_dtype(config)
  if config.stage == "autoencoder":
    from calm_jax.models.autoencoder import Autoencoder
    return Autoencoder(config.model, dtype=dtype, noise_sigmas=tuple(config.eval.noise_sigmas))
  if config.stage == "ar":
    from calm_jax.models.ar import ARLanguageModel
    return ARLanguageModel(config.model, dtype=dtype)
  if config.stage == "calm":
    if ae_model_config is None:
      raise ValueError("build_model: stage 'calm' needs ae_model_config, the config.model of "
                       "the autoencoder run in config.autoencoder.workdir.")
    from calm_jax.models.calm import CALM
    return CALM(config.model, ae_model_config, dtype=dtype)
  raise ValueError(f"config.stage={config.stage!r}; use 'autoencoder', 'ar' or 'calm'.")
