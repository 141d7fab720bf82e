"""The MLP with AdaLN conditioning (MAR / DiT style) shared by the flow and diffusion heads.

  x (latent) -> linear to D;   y = TimeEmbed(time) + linear(h)
  num_head_blocks x  x <- x + gate * MLP(LayerNorm(x) * (1 + scale) + shift),
                     [shift, scale, gate] = linear(SiLU(y))     (zero-initialised)
  LayerNorm (no affine) -> modulate by linear(SiLU(y)) (zero-initialised) -> linear to out
  (zero-initialised).

`time` is a float in [0, TIME_SCALE] (flow: 1000 t; diffusion: 1000 step / num_steps),
embedded with sinusoids of TIME_FREQ_DIM frequencies and a 2-layer MLP. Linear layers
start as Xavier-uniform with zero bias, the time MLP as normal(0.02), as in MAR.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from calm_jax.models.heads import common

TIME_SCALE = 1000.0        # the time input's range, as the DiT/MAR timestep embedding expects
TIME_FREQ_DIM = 256        # sinusoidal features of the time embedding
TIME_MAX_PERIOD = 10000.0


def timestep_features(time_x, dim=TIME_FREQ_DIM, max_period=TIME_MAX_PERIOD):
  """Sinusoidal features [..., dim] (cos then sin) of float times [...]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(time_x, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
  """x + gate * MLP(modulate(LayerNorm(x), shift, scale)), modulation from the condition y."""
  width: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_xD, y_xD):
    d = self.width
    shift, scale, gate = jnp.split(
        common.zero_dense(3 * d, ("embed", "mlp"), self.dtype, "modulation")(nn.silu(y_xD)),
        3, axis=-1)
    h = modulate(common.layer_norm(self.norm_eps, self.dtype, "norm")(x_xD), shift, scale)
    h = nn.silu(common.dense(d, ("embed", "mlp"), common.XAVIER, self.dtype, "mlp_in")(h))
    h = common.dense(d, ("mlp", "embed"), common.XAVIER, self.dtype, "mlp_out")(h)
    return x_xD + gate * h


class AdaLNMLP(nn.Module):
  """Velocity / noise network: net(x [..., l], time [...], cond [..., D]) -> [..., out_dim]."""
  width: int
  out_dim: int
  num_blocks: int
  norm_eps: float
  dtype: Any

  def setup(self):
    d = self.width
    time_init = common.normal(0.02)
    self.time_in = common.dense(d, (None, "mlp"), time_init, self.dtype, "time_in")
    self.time_out = common.dense(d, ("mlp", "embed"), time_init, self.dtype, "time_out")
    self.cond_embed = common.dense(d, ("embed", "mlp"), common.XAVIER, self.dtype, "cond_embed")
    self.input_proj = common.dense(d, ("latent", "embed"), common.XAVIER, self.dtype,
                                   "input_proj")
    self.blocks = [AdaLNBlock(d, self.norm_eps, self.dtype, name=f"block_{i}")
                   for i in range(self.num_blocks)]
    self.final_norm = common.layer_norm(self.norm_eps, self.dtype, "final_norm", affine=False)
    self.final_modulation = common.zero_dense(2 * d, ("embed", "mlp"), self.dtype,
                                              "final_modulation")
    self.final_out = common.zero_dense(self.out_dim, ("embed", "latent"), self.dtype,
                                       "final_out")

  def condition(self, h_xD):
    """The backbone state's part of the AdaLN condition (computed once per position)."""
    return self.cond_embed(h_xD)

  def __call__(self, x_xl, time_x, cond_xD):
    """x: noisy latents; time: floats in [0, TIME_SCALE]; cond: self.condition(h), broadcastable."""
    t_emb = self.time_out(nn.silu(self.time_in(timestep_features(time_x))))
    y = t_emb + cond_xD
    x = self.input_proj(x_xl)
    for block in self.blocks:
      x = block(x, y)
    shift, scale = jnp.split(self.final_modulation(nn.silu(y)), 2, axis=-1)
    out = self.final_out(modulate(self.final_norm(x), shift, scale))
    return jnp.asarray(out, jnp.float32)


class AdaLNHead(nn.Module):
  """The flow and diffusion heads' common part: their fields and the AdaLN MLP `net`."""
  model_config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.model_config
    self.net = AdaLNMLP(common.width(cfg), cfg.latent_dim, cfg.num_head_blocks, cfg.layer_norm_eps,
                        self.dtype, name="net")
