"""Causal multi-head attention with RoPE and grouped KV heads (GQA), plus its KV-cache path.

Training: attend(x_BxLxD) with positions 0..L-1 and a causal mask (jax.nn.dot_product_attention:
cuDNN flash attention on GPU, XLA elsewhere).
Decoding: the cache of one layer is {'k': [B, S, kv_heads, head_dim], 'v': same}; the
caller owns an int32 position `pos` (tokens already in the cache). extend writes the T
new keys/values at pos with dynamic_update_slice (in place: the caller's loop carries or
donates the buffers) and lets query pos+i see keys 0..pos+i. `prefix_attention` reads only
the filled prefix, block by block (online softmax), so a step costs in proportion to pos,
not to the S slots allocated.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models.layers import Dense, apply_rope, constrain

# Cache slots per block of prefix_attention and branch_attention: the decode path reads
# whole blocks; a prefill or the Brier continuations hold [B, H, T, block] scores per block.
PREFIX_BLOCK = 128


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


def _online_init(b, g, r, t, d):
  """Running max, sum and weighted values of an online softmax, float32."""
  return (jnp.full((b, g, r, t), -jnp.inf, jnp.float32), jnp.zeros((b, g, r, t), jnp.float32),
          jnp.zeros((b, g, r, t, d), jnp.float32))


def _online_update(carry, scores_BxGxRxTxS, weighted_values):
  """Folds masked scores (-inf = hidden) into the carry; weighted_values(p) -> [B, G, R, T, d]."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(scores_BxGxRxTxS, axis=-1))
  p = jnp.exp(scores_BxGxRxTxS - m_new[..., None])
  correction = jnp.exp(m - m_new)
  return (m_new, l * correction + jnp.sum(p, axis=-1),
          acc * correction[..., None] + weighted_values(p))


def _online_result(carry, dtype):
  """[B, G, R, T, d] running sums -> the attention output [B, T, G*R, d]."""
  _, l, acc = carry
  o = acc / l[..., None]
  b, g, r, t, d = o.shape
  return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, g * r, d).astype(dtype)


def _cache_blocks(q_BxTxGxRxd, k_BxSxGxd, v_BxSxGxd, last_T, num_blocks, blk, carry):
  """Folds cache blocks 0..num_blocks-1 into the carry; query i sees keys 0..last_T[i].

  The last block is shifted to end at slot S (no padding); keys an earlier block read
  are masked out of it.
  """
  s, d = k_BxSxGxd.shape[1], q_BxTxGxRxd.shape[-1]
  dtype = q_BxTxGxRxd.dtype

  def body(j, carry):
    start = jnp.minimum(j * blk, s - blk)
    k_blk = jax.lax.dynamic_slice_in_dim(k_BxSxGxd, start, blk, axis=1).astype(dtype)
    v_blk = jax.lax.dynamic_slice_in_dim(v_BxSxGxd, start, blk, axis=1).astype(dtype)
    k_pos = start + jnp.arange(blk, dtype=jnp.int32)
    visible_TxS = (k_pos[None, :] <= last_T[:, None]) & (k_pos[None, :] >= j * blk)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q_BxTxGxRxd, k_blk,
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    return _online_update(carry, jnp.where(visible_TxS, scores, -jnp.inf), lambda p: jnp.einsum(
        "bgrts,bsgd->bgrtd", p.astype(dtype), v_blk, preferred_element_type=jnp.float32))

  return jax.lax.fori_loop(0, num_blocks, body, carry)


def _grouped(q_BxTxHxd, g):
  b, t, h, d = q_BxTxHxd.shape
  return q_BxTxHxd.reshape(b, t, g, h // g, d)


def prefix_attention(q_BxTxHxd, k_BxSxGxd, v_BxSxGxd, pos, block=PREFIX_BLOCK):
  """Queries at positions pos..pos+T-1 over cached keys 0..pos+i only, block by block.

  Reads ceil((pos + T) / block) blocks of the cache (online softmax, float32 statistics), so
  slots past the filled prefix cost nothing. Equals dot_product_attention with the mask
  key <= query position.
  """
  b, t, h, d = q_BxTxHxd.shape
  g = k_BxSxGxd.shape[2]
  blk = min(block, k_BxSxGxd.shape[1])
  last_T = jnp.asarray(pos, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
  num_blocks = (last_T[-1] + blk) // blk          # blocks holding keys 0..pos+T-1
  carry = _cache_blocks(_grouped(q_BxTxHxd, g), k_BxSxGxd, v_BxSxGxd, last_T, num_blocks, blk,
                        _online_init(b, g, h // g, t, d))
  return _online_result(carry, q_BxTxHxd.dtype)


def branch_attention(q_BxPxHxd, k_BxSxGxd, v_BxSxGxd, suffix_k, suffix_v, start,
                     block=PREFIX_BLOCK):
  """P branches at once: branch p sees prefix keys 0..start+p (shared) and its own suffix keys.

  k/v_BxSxGxd: the prefix cache (read block by block, up to position start + P - 1);
  suffix_k/v: lists of [B, P, G, d], branch p's own tokens so far (its last query among
  them). One softmax over both.
  """
  b, p, h, d = q_BxPxHxd.shape
  g = k_BxSxGxd.shape[2]
  q_BxPxGxRxd = _grouped(q_BxPxHxd, g)
  blk = min(block, k_BxSxGxd.shape[1])
  last_P = jnp.asarray(start, jnp.int32) + jnp.arange(p, dtype=jnp.int32)
  carry = _cache_blocks(q_BxPxGxRxd, k_BxSxGxd, v_BxSxGxd, last_P, (last_P[-1] + blk) // blk, blk,
                        _online_init(b, g, h // g, p, d))
  dtype = q_BxPxHxd.dtype
  for k_BxPxGxd, v_BxPxGxd in zip(suffix_k, suffix_v):
    score = jnp.einsum("bpgrd,bpgd->bgrp", q_BxPxGxRxd, k_BxPxGxd.astype(dtype),
                       preferred_element_type=jnp.float32) * (d ** -0.5)
    carry = _online_update(carry, score[..., None], lambda w, v=v_BxPxGxd: jnp.einsum(
        "bgrp,bpgd->bgrpd", w[..., 0].astype(dtype), v.astype(dtype),
        preferred_element_type=jnp.float32))
  return _online_result(carry, dtype)


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
    o = prefix_attention(q, k_cache, v_cache, pos)
    out = self.out(constrain(o, ("batch", "length", "act_heads", None)))
    return out, {"k": k_cache, "v": v_cache}

  def extend_branches(self, x_BxPxD, kv, suffix, start):
    """Branch p (after prefix positions 0..start+p of the cache kv) appends one token at
    position start + p + 1 + J to its suffix {'k', 'v': lists of J arrays [B, P, G, d]};
    returns (out, suffix)."""
    p, j = x_BxPxD.shape[1], len(suffix["k"])
    q, k, v = self._qkv(x_BxPxD, (start + jnp.arange(p) + 1 + j)[None])
    suffix = {"k": suffix["k"] + [k], "v": suffix["v"] + [v]}
    o = branch_attention(q, kv["k"], kv["v"], suffix["k"], suffix["v"], start)
    return self.out(constrain(o, ("batch", "length", "act_heads", None))), suffix
