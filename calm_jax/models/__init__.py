"""Model zoo: the linen modules of the three stages and the compute dtype they run in (stages.py builds them)."""
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
  """The compute dtype named by config.train.compute_dtype (params stay float32)."""
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.train.compute_dtype={config.train.compute_dtype!r}; "
                     f"use one of {sorted(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[config.train.compute_dtype]
