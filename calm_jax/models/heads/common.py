"""Dense and LayerNorm constructors shared by the generative heads (biases, logical axis names).

The heads follow the paper's MLPs: every linear layer has a bias and the norms are
LayerNorms (the backbone's layers.py is bias-free RMSNorm Llama style). Params are
float32 and carry logical axis names; computation runs in `dtype`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros_init()


def width(model_config):
  """The head's width D: model.head_hidden, or the backbone's hidden where that is 0 (the
  reference ties them; a narrower head leaves FLOPs for more steps where the head dominates)."""
  return model_config.head_hidden or model_config.hidden


def normal(std):
  return nn.initializers.normal(stddev=std)


def dense(features, axes, kernel_init, dtype, name):
  """nn.Dense with a bias; `axes` names the (input, output) kernel dims."""
  return nn.Dense(
      features, use_bias=True, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
      bias_init=nn.with_logical_partitioning(ZEROS, (axes[-1],)),
      name=name)


def zero_dense(features, axes, dtype, name):
  """A dense layer whose kernel and bias start at 0 (output layers, AdaLN modulation)."""
  return dense(features, axes, ZEROS, dtype, name)


def layer_norm(eps, dtype, name, affine=True, axis_name="embed"):
  """LayerNorm over the last dim, optionally without scale/bias.

  Statistics in float32 with the two-pass variance mean((x - mean)^2) of torch's
  nn.LayerNorm (flax's default one-pass E[x^2] - E[x]^2 loses digits when |mean| >> std).
  """
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_scale=affine, use_bias=affine,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(ZEROS, (axis_name,)),
      name=name)


def posterior_from_noise(mean_Nxl, log_std_Nxl, eps_SxNxl):
  """y = mean + eps * exp(log_std) for standard normal eps [S, N, l]: [S, N, l] float32."""
  mean = jnp.asarray(mean_Nxl, jnp.float32)
  std = jnp.exp(jnp.asarray(log_std_Nxl, jnp.float32))
  return mean + jnp.asarray(eps_SxNxl, jnp.float32) * std


def posterior_samples(rng, mean_Nxl, log_std_Nxl, num):
  """num draws y = mean + std * eps from the autoencoder posterior: [num, N, l] float32."""
  eps = jax.random.normal(rng, (num,) + jnp.shape(mean_Nxl), jnp.float32)
  return posterior_from_noise(mean_Nxl, log_std_Nxl, eps)
