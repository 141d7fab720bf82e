"""Llama-style building blocks: Dense, Embed, RMSNorm, SwiGLU MLP and RoPE.

Every param is float32 and carries logical axis names (nn.with_logical_partitioning);
computation runs in `dtype` (float32 or bfloat16). Norms and RoPE compute in float32.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def normal_init(std, names):
  """A normal(0, std) initializer boxed with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(names))


def constrain(x, names):
  """nn.with_logical_constraint; a no-op outside a mesh with logical rules."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """x[..., *in] @ kernel[*in, *out]: contracts the trailing len(axes) - len(features) dims.

  `axes` names every kernel dim (inputs first, then outputs); `features` is the
  output shape, e.g. Dense((H, d), axes=('embed', 'heads', 'head_dim')) maps
  x_BxLxD to BxLxHxd and Dense(D, axes=('heads', 'head_dim', 'embed')) maps it back.
  No bias unless use_bias (Llama has none; the paper's autoencoder projections do).
  """
  features: int | Sequence[int]
  axes: Sequence[str | None]
  init_std: float
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.axes) - len(features)
    if n_in < 1:
      raise ValueError(f"Dense {self.name}: axes {self.axes} must name the input dims and "
                       f"then the {len(features)} output dims.")
    kernel_shape = tuple(x.shape[-n_in:]) + features
    kernel = self.param("kernel", normal_init(self.init_std, self.axes), kernel_shape,
                        self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    y = jax.lax.dot_general(
        x, jnp.asarray(kernel, self.dtype),
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               tuple(self.axes[n_in:])),
          features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class Embed(nn.Module):
  """Token embedding [V, D] ('vocab', 'embed'); attend() is the tied output projection."""
  vocab_size: int
  features: int
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", normal_init(self.init_std, ("vocab", "embed")),
                                (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.asarray(jnp.take(self.embedding, ids, axis=0), self.dtype)

  def attend(self, x_xD):
    """x[..., D] -> logits[..., V] = x @ embedding^T (in the compute dtype)."""
    return jnp.einsum("...d,vd->...v", jnp.asarray(x_xD, self.dtype),
                      jnp.asarray(self.embedding, self.dtype))


class RMSNorm(nn.Module):
  """scale * (x / rms(x)) over the last dim (Llama's LlamaRMSNorm); scale is initialised to 1.

  As in the reference, the normalisation runs in float32 and its result is rounded back
  to the input's dtype *before* the float32 scale multiplies it: a bfloat16 input is
  rounded once more than a float32 one (the reference autoencoder's training-mode
  bfloat16 embeddings depend on this). The output is in the compute `dtype`.
  """
  eps: float
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    normed = jnp.asarray(jnp.asarray(x32, x.dtype), jnp.float32)
    return jnp.asarray(normed * jnp.asarray(scale, jnp.float32), self.dtype)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""
  hidden: int
  mlp: int
  init_std: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    dense = lambda f, axes, name: Dense(f, axes, self.init_std, dtype=self.dtype, name=name)
    gate = dense(self.mlp, ("embed", "mlp"), "gate")(x_BxLxD)
    up = dense(self.mlp, ("embed", "mlp"), "up")(x_BxLxD)
    h_BxLxF = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense(self.hidden, ("mlp", "embed"), "down")(h_BxLxF)


def rope_tables(positions, head_dim, theta):
  """cos, sin tables [..., head_dim // 2] in float32 for integer positions [...]."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}: pick hidden/heads even.")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxd, positions_BxL, theta):
  """Rotary embedding, Llama/HF convention (rotate the two halves of each head).

  positions_BxL: int positions of the L tokens (any shape broadcastable to [B, L]).
  """
  d = x_BxLxHxd.shape[-1]
  cos, sin = rope_tables(positions_BxL, d, theta)
  cos, sin = cos[..., None, :], sin[..., None, :]       # broadcast over heads
  x = jnp.asarray(x_BxLxHxd, jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.asarray(out, x_BxLxHxd.dtype)
