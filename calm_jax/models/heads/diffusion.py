"""The diffusion head (MAR style): an AdaLN MLP denoiser, cosine schedule, DDIM sampling.

Training: t ~ U{0..T-1} with T = model.diffusion_train_steps, the cosine schedule
alpha_bar (Nichol & Dhariwal 2021, betas clipped at 0.999), y drawn from the frozen
autoencoder's posterior, x_t = sqrt(ab_t) y + sqrt(1 - ab_t) eps. The network predicts
v = sqrt(ab_t) eps - sqrt(1 - ab_t) y (Salimans & Ho 2022); loss = mean_l (v_pred - v)^2,
head_batch_mul draws per position.

Why v and not MAR's epsilon: with the cosine schedule ab_{T-1} is ~1e-9, so an
epsilon model recovers y = (x_t - sqrt(1 - ab) eps_pred) / sqrt(ab) with its errors
amplified ~3e4 times at the first sampling step; from v both y and eps are bounded
combinations (y = sqrt(ab) x_t - sqrt(1 - ab) v, eps = sqrt(1 - ab) x_t + sqrt(ab) v).
MAR also learns the variance (a VLB term); we sample deterministically instead.

Sampling: deterministic DDIM (eta = 0) over model.diffusion_sample_steps timesteps
evenly spaced from T-1 down to 0, then one last step to ab = 1 (the clean latent).
The only randomness is the initial Gaussian noise (rng stream 'sample').
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models.heads import adaln_mlp
from calm_jax.models.heads import common

MAX_BETA = 0.999
COSINE_OFFSET = 0.008


def cosine_alpha_bar(num_steps):
  """alpha_bar_t for t = 0..num_steps-1 of the cosine schedule (float64 numpy)."""
  f = lambda t: math.cos((t / num_steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
  betas = np.array([min(1 - f(t + 1) / f(t), MAX_BETA) for t in range(num_steps)])
  return np.cumprod(1.0 - betas)


def sampling_timesteps(num_train_steps, num_sample_steps):
  """Descending int timesteps (T-1 ... 0) for sampling, evenly spaced, without repeats."""
  if not 1 <= num_sample_steps <= num_train_steps:
    raise ValueError(
        f"model.diffusion_sample_steps={num_sample_steps} must be in "
        f"[1, model.diffusion_train_steps={num_train_steps}].")
  return np.round(np.linspace(num_train_steps - 1, 0, num_sample_steps)).astype(np.int32)


class DiffusionHead(adaln_mlp.AdaLNHead):
  """Diffusion head; methods loss(h, mean, log_std) and sample(h) (rng stream 'sample')."""

  def _time(self, t_int):
    """Integer timestep -> the network's time input in [0, TIME_SCALE)."""
    steps = self.model_config.diffusion_train_steps
    return jnp.asarray(t_int, jnp.float32) * (adaln_mlp.TIME_SCALE / steps)

  def loss(self, h_NxD, mean_Nxl, log_std_Nxl):
    """v-prediction MSE per position: (loss_N, {'diffusion_loss': loss_N})."""
    cfg = self.model_config
    alpha_bar_T = jnp.asarray(cosine_alpha_bar(cfg.diffusion_train_steps), jnp.float32)
    y_SxNxl = common.posterior_samples(self.make_rng("sample"), mean_Nxl, log_std_Nxl,
                                       cfg.head_batch_mul)
    k_noise, k_time = jax.random.split(self.make_rng("sample"))
    eps_SxNxl = jax.random.normal(k_noise, y_SxNxl.shape, jnp.float32)
    t_SxN = jax.random.randint(k_time, y_SxNxl.shape[:-1], 0, cfg.diffusion_train_steps)
    ab = alpha_bar_T[t_SxN][..., None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    xt_SxNxl = a * y_SxNxl + s * eps_SxNxl
    v_SxNxl = a * eps_SxNxl - s * y_SxNxl
    v_pred = self.net(xt_SxNxl, self._time(t_SxN), self.net.condition(h_NxD)[None])
    loss_N = jnp.mean(jnp.square(v_pred - v_SxNxl), axis=(0, 2))
    return loss_N, dict(diffusion_loss=loss_N)

  def sample(self, h_xD):
    """h [..., D] -> z [..., l]: deterministic DDIM from Gaussian noise (float32)."""
    cfg = self.model_config
    alpha_bar = cosine_alpha_bar(cfg.diffusion_train_steps)
    t_S = sampling_timesteps(cfg.diffusion_train_steps, cfg.diffusion_sample_steps)
    ab_S = alpha_bar[t_S]
    ab_prev_S = np.append(ab_S[1:], 1.0)   # the last step lands on the clean latent
    xs = (jnp.asarray(t_S), jnp.asarray(ab_S, jnp.float32), jnp.asarray(ab_prev_S, jnp.float32))
    cond_xD = self.net.condition(h_xD)
    x = jax.random.normal(self.make_rng("sample"), h_xD.shape[:-1] + (cfg.latent_dim,),
                          jnp.float32)

    def body(head, x_xl, step):
      t, ab, ab_prev = step
      v = head.net(x_xl, jnp.full(x_xl.shape[:-1], head._time(t)), cond_xD)
      y_pred = jnp.sqrt(ab) * x_xl - jnp.sqrt(1.0 - ab) * v
      eps_pred = jnp.sqrt(1.0 - ab) * x_xl + jnp.sqrt(ab) * v
      return jnp.sqrt(ab_prev) * y_pred + jnp.sqrt(1.0 - ab_prev) * eps_pred, None

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   length=len(t_S))
    x, _ = scan(self, x, xs)
    return x
