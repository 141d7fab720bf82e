"""Generative heads that turn a backbone state into the next chunk's latent: energy, flow, diffusion.

Each head has loss(h_NxD, mean_Nxl, log_std_Nxl) -> (loss_N, metrics of float32[N]) and
sample(h_xD) -> z_xl, both drawing randomness from the rng stream 'sample'.
"""
from calm_jax.models.heads.diffusion import DiffusionHead
from calm_jax.models.heads.energy import EnergyHead
from calm_jax.models.heads.flow import FlowHead

HEADS = {"energy": EnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}


def build_head(model_config, dtype, name="head"):
  """The head named by model_config.head ('energy' | 'flow' | 'diffusion')."""
  if model_config.head not in HEADS:
    raise ValueError(
        f"config.model.head={model_config.head!r} is not a known head; use one of {sorted(HEADS)}.")
  return HEADS[model_config.head](model_config, dtype, name=name)
