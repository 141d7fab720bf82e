"""The flow-matching head: a velocity MLP with AdaLN conditioning, sampled with a midpoint ODE solver.

Rectified-flow (linear) path from noise x0 ~ N(0, I) at t = 0 to a target y at t = 1:
  x_t = (1 - t) x0 + t y,  velocity v = y - x0,  loss = mean_l (v_pred(x_t, t, h) - v)^2,
with t ~ U[0, 1] and y drawn from the frozen autoencoder's posterior N(mean, std^2);
head_batch_mul independent (y, x0, t) draws per position, averaged.
Sampling integrates dx/dt = v_pred from t = 0 to 1 in model.flow_steps midpoint steps
(2 network calls per step).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models.heads import adaln_mlp
from calm_jax.models.heads import common


def _midpoint_step(head, x_xl, t_x, dt, cond_xD):
  v1 = head.net(x_xl, adaln_mlp.TIME_SCALE * t_x, cond_xD)
  x_mid = x_xl + 0.5 * dt * v1
  v_mid = head.net(x_mid, adaln_mlp.TIME_SCALE * (t_x + 0.5 * dt), cond_xD)
  return x_xl + dt * v_mid


class FlowHead(adaln_mlp.AdaLNHead):
  """Flow-matching head; methods loss(h, mean, log_std) and sample(h) (rng stream 'sample')."""

  def loss(self, h_NxD, mean_Nxl, log_std_Nxl):
    """Velocity MSE per position: (loss_N, {'flow_loss': loss_N})."""
    s = self.model_config.head_batch_mul
    y_SxNxl = common.posterior_samples(self.make_rng("sample"), mean_Nxl, log_std_Nxl, s)
    k_noise, k_time = jax.random.split(self.make_rng("sample"))
    x0_SxNxl = jax.random.normal(k_noise, y_SxNxl.shape, jnp.float32)
    t_SxN = jax.random.uniform(k_time, y_SxNxl.shape[:-1], jnp.float32)
    xt_SxNxl = (1.0 - t_SxN[..., None]) * x0_SxNxl + t_SxN[..., None] * y_SxNxl
    cond_1xNxD = self.net.condition(h_NxD)[None]
    v_pred = self.net(xt_SxNxl, adaln_mlp.TIME_SCALE * t_SxN, cond_1xNxD)
    loss_N = jnp.mean(jnp.square(v_pred - (y_SxNxl - x0_SxNxl)), axis=(0, 2))
    return loss_N, dict(flow_loss=loss_N)

  def sample(self, h_xD):
    """h [..., D] -> z [..., l]: flow_steps midpoint steps from Gaussian noise (float32)."""
    cfg = self.model_config
    steps = cfg.flow_steps
    cond_xD = self.net.condition(h_xD)
    x = jax.random.normal(self.make_rng("sample"), h_xD.shape[:-1] + (cfg.latent_dim,),
                          jnp.float32)
    dt = 1.0 / steps

    def body(head, x_xl, t):
      return _midpoint_step(head, x_xl, jnp.full(x_xl.shape[:-1], t), dt, cond_xD), None

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   length=steps)
    x, _ = scan(self, x, jnp.arange(steps, dtype=jnp.float32) * dt)
    return x
