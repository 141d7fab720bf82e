"""The energy head: one forward pass turns uniform noise and a backbone state into a latent sample.

  u ~ U[-0.5, 0.5]^noise_dim -> linear to D -> LayerNorm            (the stream x)
  h (backbone state)         -> linear to D -> LayerNorm            (the condition c)
  (D = common.width: the backbone's hidden, as in the reference, unless model.head_hidden sets it)
  num_head_blocks x  x <- x + down(silu(gate) * up),  [gate, up] = MLP(concat(LayerNorm(x), c))
                                         MLP: 2D -> D, SiLU, D -> D, SiLU, D -> 2D
  LayerNorm -> linear D -> D -> SiLU -> linear D -> l   (last layer zero-initialised)

Trained with the energy loss (energy_score.py): N head samples against M samples of
the frozen autoencoder's posterior per position. Linear layers start as normal(init_std)
with zero bias, as the reference's Llama-style initialisation.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import energy_score
from calm_jax.models.heads import common


class SplitFuse(nn.Module):
  """The fusion block's first layer, concat(x, c) @ kernel + bias, as x @ kernel[:D] + (c @ kernel[D:]
  + bias): the condition's share is computed on c's own shape, once per position however many
  samples x holds. Params as nn.Dense(D) on the concatenation: kernel [2D, D], bias [D]."""
  width: int
  init_std: float
  dtype: Any

  @nn.compact
  def __call__(self, x_xD, c_xD):
    d = x_xD.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(common.normal(self.init_std),
                                                               ("embed", "mlp")),
                        (d + c_xD.shape[-1], self.width), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(common.ZEROS, ("mlp",)),
                      (self.width,), jnp.float32)
    kernel = jnp.asarray(kernel, self.dtype)
    share = jnp.asarray(c_xD, self.dtype) @ kernel[d:] + jnp.asarray(bias, self.dtype)
    return jnp.asarray(x_xD, self.dtype) @ kernel[:d] + share


class FusionBlock(nn.Module):
  """x + down(silu(gate) * up) with [gate, up] from an MLP over concat(LayerNorm(x), c).

  c may hold fewer leading dims than x (broadcast, e.g. one condition for N samples): its
  share of the first layer is computed once (SplitFuse).
  """
  width: int
  init_std: float
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_xD, c_xD):
    d, init = self.width, common.normal(self.init_std)
    dense = lambda f, axes, name: common.dense(f, axes, init, self.dtype, name)
    h = common.layer_norm(self.norm_eps, self.dtype, "norm")(x_xD)
    h = nn.silu(SplitFuse(d, self.init_std, self.dtype, name="fuse")(h, c_xD))
    h = nn.silu(dense(d, ("mlp", "embed"), "hidden")(h))
    gate, up = jnp.split(dense(2 * d, ("embed", "mlp"), "gate_up")(h), 2, axis=-1)
    return x_xD + dense(d, ("mlp", "embed"), "down")(nn.silu(gate) * up)


class EnergyHead(nn.Module):
  """Energy head; methods loss(h, mean, log_std) and sample(h) (rng stream 'sample')."""
  model_config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.model_config
    d, init = common.width(cfg), common.normal(cfg.init_std)
    ln = lambda name: common.layer_norm(cfg.layer_norm_eps, self.dtype, name)
    self.noise_embed = common.dense(d, ("noise", "embed"), init, self.dtype, "noise_embed")
    self.noise_norm = ln("noise_norm")
    self.hidden_embed = common.dense(d, ("embed", "mlp"), init, self.dtype, "hidden_embed")
    self.hidden_norm = ln("hidden_norm")
    self.blocks = [FusionBlock(d, cfg.init_std, cfg.layer_norm_eps, self.dtype,
                               name=f"block_{i}") for i in range(cfg.num_head_blocks)]
    self.final_norm = ln("final_norm")
    self.final_hidden = common.dense(d, ("embed", "mlp"), init, self.dtype, "final_hidden")
    self.final_out = common.zero_dense(cfg.latent_dim, ("mlp", "latent"), self.dtype,
                                       "final_out")

  def condition(self, h_xD):
    """The backbone state as the blocks' condition c (computed once per position)."""
    return self.hidden_norm(self.hidden_embed(h_xD))

  def generate(self, c_xD, u_xU):
    """Noise u ([..., noise_dim]) and condition c ([..., D], broadcastable) -> latent [..., l]."""
    x = self.noise_norm(self.noise_embed(u_xU))
    for block in self.blocks:
      x = block(x, c_xD)
    x = self.final_out(nn.silu(self.final_hidden(self.final_norm(x))))
    return jnp.asarray(x, jnp.float32)

  def _noise(self, shape):
    return jax.random.uniform(self.make_rng("sample"), shape + (self.model_config.noise_dim,),
                              jnp.float32, minval=-0.5, maxval=0.5)

  def sample(self, h_xD):
    """One head sample per backbone vector: h [..., D] -> z [..., l] (float32)."""
    return self.generate(self.condition(h_xD), self._noise(h_xD.shape[:-1]))

  def loss_noise(self, n):
    """The random draws of `loss` for n positions, from the rng stream 'sample'.

    {'u': [num_model_samples, n, noise_dim] uniform in [-0.5, 0.5) (the head's input noise),
     'eps': [num_target_samples, n, l] standard normal (the posterior samples' noise)}.
    """
    cfg = self.model_config
    u = self._noise((cfg.num_model_samples, n))
    eps = jax.random.normal(self.make_rng("sample"), (cfg.num_target_samples, n, cfg.latent_dim),
                            jnp.float32)
    return {"u": u, "eps": eps}

  def loss(self, h_NxD, mean_Nxl, log_std_Nxl, noise=None, beta=None):
    """Energy loss per position: (loss_N, metrics of float32[N]).

    noise: the draws of `loss_noise` to use instead of fresh ones (the reference checks
    inject the reference's own draws here); None draws them from the rng stream 'sample'.
    beta: the exponent (a scalar, traced in training under a schedule); None: config.beta.
    """
    cfg = self.model_config
    beta = cfg.beta if beta is None else beta
    noise = self.loss_noise(h_NxD.shape[0]) if noise is None else noise
    x_SxNxl = self.generate(self.condition(h_NxD)[None], noise["u"])
    y_MxNxl = common.posterior_from_noise(mean_Nxl, log_std_Nxl, noise["eps"])
    fidelity_N, diversity_N = energy_score.energy_terms(x_SxNxl, y_MxNxl, beta)
    loss_N = 2.0 * fidelity_N - diversity_N
    mean_sq_SxN = jnp.sum(jnp.square(x_SxNxl - jnp.asarray(mean_Nxl, jnp.float32)), axis=-1)
    sample_to_mean_N = jnp.mean(energy_score.safe_norm_pow(mean_sq_SxN, 1.0), axis=0)
    metrics = dict(energy_loss=loss_N, fidelity=fidelity_N, diversity=diversity_N,
                   sample_to_mean=jax.lax.stop_gradient(sample_to_mean_N))
    return loss_N, metrics
