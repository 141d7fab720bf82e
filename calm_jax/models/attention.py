"""Causal multi-head attention with RoPE and grouped KV heads (GQA), plus its KV-cache path.

Training: attend(x_BxLxD) with positions 0..L-1 and a causal mask.
Decoding: the cache of one layer is {'k': [B, S, kv_heads, head_dim], 'v': same}; the
caller owns an int32 position `pos` (tokens already in the cache). extend writes the T
new keys/values at pos with dynamic_update_slice and lets query pos+i see keys 0..pos+i.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models.layers import Dense, apply_rope, constrain


def _implementation(q, k, has_mask):
  """cuDNN flash attention on GPU for bf16/fp16 causal attention without a mask, else XLA."""
  if (jax.default_backend() == "gpu" and not has_mask
      and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
    return "cudnn"
  return None        # jax picks XLA


def dot_product_attention(q_BxTxHxd, k_BxSxGxd, v_BxSxGxd, mask=None, is_causal=False):
  """jax.nn.dot_product_attention; GQA when G < H. Falls back to XLA if cuDNN refuses."""
  impl = _implementation(q_BxTxHxd, k_BxSxGxd, mask is not None)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q_BxTxHxd, k_BxSxGxd, v_BxSxGxd, mask=mask,
                                          is_causal=is_causal, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass        # unsupported shape/version: use the XLA path below
  return jax.nn.dot_product_attention(q_BxTxHxd, k_BxSxGxd, v_BxSxGxd, mask=mask,
                                      is_causal=is_causal, implementation=None)


class Attention(nn.Module):
  """RoPE multi-head attention with kv_heads <= heads (heads % kv_heads == 0), no biases."""
  hidden: int
  heads: int
  kv_heads: int
  rope_theta: float
  init_std: float
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.hidden % self.heads or self.heads % self.kv_heads:
      raise ValueError(
          f"Attention: model.hidden ({self.hidden}) must be a multiple of model.heads "
          f"({self.heads}) and model.heads a multiple of model.kv_heads ({self.kv_heads}).")
    d = self.hidden // self.heads
    dense = lambda f, axes: Dense(f, axes, self.init_std, dtype=self.dtype)
    self.query = dense((self.heads, d), ("embed", "heads", "head_dim"))
    self.key = dense((self.kv_heads, d), ("embed", "kv_heads", "head_dim"))
    self.value = dense((self.kv_heads, d), ("embed", "kv_heads", "head_dim"))
    self.out = dense(self.hidden, ("heads", "head_dim", "embed"))

  def _qkv(self, x_BxTxD, positions):
    q = apply_rope(self.query(x_BxTxD), positions, self.rope_theta)
    k = apply_rope(self.key(x_BxTxD), positions, self.rope_theta)
    v = self.value(x_BxTxD)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    return q, k, v

  def __call__(self, x_BxLxD):
    """Full causal self-attention over positions 0..L-1."""
    q, k, v = self._qkv(x_BxLxD, jnp.arange(x_BxLxD.shape[1])[None])
    o_BxLxHxd = dot_product_attention(q, k, v, is_causal=True)
    return self.out(constrain(o_BxLxHxd, ("batch", "length", "act_heads", None)))

  def extend(self, x_BxTxD, kv, pos):
    """Appends T tokens at position pos to the layer cache kv; returns (out_BxTxD, kv)."""
    t = x_BxTxD.shape[1]
    q, k, v = self._qkv(x_BxTxD, (pos + jnp.arange(t))[None])
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(pos, jnp.int32), zero, zero)
    k_cache = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start)
    v_cache = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)
    s = k_cache.shape[1]
    # Query i (absolute position pos + i) sees keys 0..pos+i; later slots are empty or stale.
    mask_TxS = jnp.arange(s)[None, :] <= (pos + jnp.arange(t))[:, None]
    o = dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                              mask=mask_TxS[None, None])
    out = self.out(constrain(o, ("batch", "length", "act_heads", None)))
    return out, {"k": k_cache, "v": v_cache}
