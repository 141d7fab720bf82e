"""The causal Llama-style Transformer stack (pre-norm RMSNorm, RoPE GQA attention, SwiGLU).

Works on embeddings: x_BxLxD -> normed hidden states h_BxLxD. The model config fields
read: hidden, mlp, layers, heads, kv_heads, rope_theta, norm_eps, init_std, remat,
scan_layers. With scan_layers the blocks are one nn.scan (params get a leading
'layers' axis, compile time flat in depth); otherwise they are layers_0..layers_{n-1}.

KV cache (one layout for both): {'layers': [{'k': [B, S, kv_heads, head_dim], 'v': same}
per layer], 'pos': int32[]} with pos = number of positions already written (the same for
every row). Each layer's buffers are separate arrays that extend updates in place
(dynamic_update_slice; a decode loop carries them, a jitted step donates them), and
attention reads only the filled prefix (attention.prefix_attention): a decode step costs
the same with 256 or 4,096 slots. The cache path runs the layers one by one, slicing a
scanned stack's params per layer. init_cache is a pure function of the config; extend
appends T positions. Writing past S is not checked (dynamic_update_slice clamps): size
the cache for the run.

Branches (the Brier estimators' continuations): after a prefill of the cache, branch p
continues from position start + p alone. extend_branches appends one token to each of the
P branches at once: branch p's token at position start + p + 1 + J attends to the shared
prefix cache (keys 0..start+p, read-only) and to its own J earlier tokens, {'layers':
[{'k', 'v': lists of J arrays [B, P, kv_heads, head_dim]}], 'start': int32[]}
(init_branches: J = 0), so no branch copies the prefix cache.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models.attention import Attention
from calm_jax.models.layers import MLP, RMSNorm, constrain

REMAT_POLICIES = {
    "full": None,                                                   # save nothing
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def init_branches(model_config, start=0):
  """Branches from positions start, start+1, ... with no token yet (see the module docstring)."""
  return {"layers": [{"k": [], "v": []} for _ in range(model_config.layers)],
          "start": jnp.asarray(start, jnp.int32)}


def head_dim(model_config):
  return model_config.hidden // model_config.heads


def init_cache(model_config, batch_size, max_len, dtype=jnp.float32):
  """An empty KV cache for `max_len` positions (a pure function of the config)."""
  shape = (batch_size, max_len, model_config.kv_heads, head_dim(model_config))
  layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(model_config.layers)]
  return {"layers": layers, "pos": jnp.zeros((), jnp.int32)}


class Block(nn.Module):
  """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

  __call__(x, kv, pos, suffix) -> (x, kv): kv=None is the training path (full causal
  attention); otherwise kv is this layer's cache and the T inputs go at pos; with a suffix,
  x holds one token per branch (attention.extend_branches, the first branching at pos) and
  the suffix comes back in place of kv.
  """
  config: object
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, kv, pos, suffix=None):
    c = self.config
    attn = Attention(c.hidden, c.heads, c.kv_heads, c.rope_theta, c.init_std,
                     dtype=self.dtype, name="attn")
    h = RMSNorm(c.norm_eps, dtype=self.dtype, name="attn_norm")(x_BxTxD)
    if kv is None:
      h = attn(h)
    elif suffix is None:
      h, kv = attn.extend(h, kv, pos)
    else:
      h, kv = attn.extend_branches(h, kv, suffix, pos)
    x = constrain(x_BxTxD + h, ("batch", "length", "act_embed"))
    h = RMSNorm(c.norm_eps, dtype=self.dtype, name="mlp_norm")(x)
    h = MLP(c.hidden, c.mlp, c.init_std, dtype=self.dtype, name="mlp")(h)
    x = constrain(x + h, ("batch", "length", "act_embed"))
    return x, kv


def _block_class(config):
  if config.remat == "none":
    return Block
  if config.remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={config.remat!r}; use 'none', 'full' or 'dots'.")
  return nn.remat(Block, policy=REMAT_POLICIES[config.remat],
                  prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
  """Causal Transformer on embeddings; final RMSNorm included."""
  config: object
  dtype: jnp.dtype = jnp.float32

  def _blocks(self, x_BxTxD):
    """Runs every block on the training path (full causal attention, no cache)."""
    c = self.config
    block = _block_class(c)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=c.layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      return stack(c, dtype=self.dtype, name="layers")(x_BxTxD, None, None)[0]
    for i in range(c.layers):
      x_BxTxD, _ = block(c, dtype=self.dtype, name=f"layers_{i}")(x_BxTxD, None, None)
    return x_BxTxD

  def _layer_variables(self, i):
    """Layer i's params: layers_i, or slice i of the scanned stack."""
    params = nn.unbox(self.variables["params"])
    if self.config.scan_layers:
      return {"params": jax.tree.map(lambda a: a[i], params["layers"])}
    return {"params": params[f"layers_{i}"]}

  def _cached_blocks(self, x_BxTxD, cache, branches):
    """The cache path: the layers one by one, each extending its own cache (or, with
    branches, its suffix cache) in place; returns (x, the updated per-layer caches)."""
    block = Block(self.config, dtype=self.dtype, parent=None)
    layers = []
    for i, kv in enumerate(cache["layers"]):
      extra = ((cache["pos"],) if branches is None
               else (branches["start"], branches["layers"][i]))
      x_BxTxD, kv = block.apply(self._layer_variables(i), x_BxTxD, kv, *extra)
      layers.append(kv)
    return x_BxTxD, layers

  @nn.compact
  def __call__(self, x_BxLxD, cache=None, branches=None):
    """h_BxLxD for positions 0..L-1; with a cache, extend(x, cache) (returns (h, cache));
    with branches too, extend_branches (returns (h, branches))."""
    x = constrain(jnp.asarray(x_BxLxD, self.dtype), ("batch", "length", "act_embed"))
    if cache is None:
      x = self._blocks(x)
    elif branches is None:
      x, layers = self._cached_blocks(x, cache, None)
      cache = {"layers": layers, "pos": cache["pos"] + x_BxLxD.shape[1]}
    else:
      x, layers = self._cached_blocks(x, cache, branches)
      cache = {"layers": layers, "start": branches["start"]}
    h = RMSNorm(self.config.norm_eps, dtype=self.dtype, name="final_norm")(x)
    return h if cache is None else (h, cache)

  def extend(self, x_BxTxD, cache):
    """Incremental decoding: appends T positions at cache['pos']; returns (h_BxTxD, cache)."""
    return self(x_BxTxD, cache)

  def extend_branches(self, x_BxPxD, cache, branches):
    """One token per branch (branch p continues from position p of the prefilled cache);
    returns (h_BxPxD, branches). The cache is only read."""
    return self(x_BxPxD, cache, branches)
