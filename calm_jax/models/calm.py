"""CALM (stage 2): a Transformer over chunk vectors that predicts the next chunk's latent with a head.

  tokens_BxL -> T = L/K chunks of K tokens
  input  t:  the K token embeddings of chunk t, concatenated (K*D) -> 2D -> SiLU -> D -> LayerNorm
  backbone:  causal Transformer over the chunk inputs 0..T-2 -> h_t (predicts chunk t+1)
  target t:  the frozen autoencoder's posterior (mean, log_std) of chunk t+1 (in training
             with model.targets_bf16_embeddings_in_training, from bfloat16-rounded token
             embeddings, as the reference computes them: its trainer's model.train() also
             puts the frozen autoencoder in training mode)
  loss:      the generative head's per-position loss (energy score by default), averaged over
             target chunks whose K tokens all have mask 1.

Params: 'embed' (CALM's own token embedding [V, D]), 'compress' (the input MLP and
LayerNorm), 'transformer', 'head' and 'autoencoder' (the frozen stage-1 model: the trainer
never optimises it, and everything read from it passes through stop_gradient).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import heads
from calm_jax.models import transformer as transformer_lib
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.heads import common as head_layers
from calm_jax.models.layers import Dense, Embed, constrain
from calm_jax.models.losses import masked_mean


def energy_beta(config, step):
  """The energy exponent at an optimizer step: beta_start at step 0, linearly to beta over
  beta_anneal_steps, then beta (step None, as in eval: beta).

  A large exponent pulls far-off head samples in with a constant force; a small one is more
  local (rewards landing on the right chunk more) but hardly moves a far-off sample, so it
  starts slowly or stalls on some data (benchmarks/RESULTS.md, sixth session).
  """
  if step is None or config.beta_anneal_steps == 0:
    return config.beta            # a Python float: the exact graph of a constant exponent
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / config.beta_anneal_steps, 1.0)
  return jnp.float32(config.beta_start) + frac * jnp.float32(config.beta - config.beta_start)


# Fields that must agree between the CALM config and its autoencoder's config.
SHARED_FIELDS = ("patch_size", "latent_dim", "vocab_size")


class InputCompression(nn.Module):
  """K token embeddings of a chunk -> one vector: (K*D) -> 2D -> SiLU -> D -> LayerNorm."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxKD):
    c = self.config
    dense = lambda f, axes, name: Dense(f, axes, c.init_std, use_bias=True, dtype=self.dtype,
                                        name=name)
    h = nn.silu(dense(2 * c.hidden, ("embed", "mlp"), "expand")(x_BxTxKD))
    h = dense(c.hidden, ("mlp", "embed"), "project")(h)
    h = head_layers.layer_norm(c.layer_norm_eps, self.dtype, "norm")(h)
    return constrain(h, ("batch", "length", "act_embed"))


class CALM(nn.Module):
  """The stage-2 model; see the module docstring for the params and the methods below."""
  config: Any
  ae_config: Any
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    for field in SHARED_FIELDS:
      if c[field] != self.ae_config[field]:
        raise ValueError(
            f"CALM: config.model.{field}={c[field]} differs from the autoencoder's "
            f"{self.ae_config[field]}; set config.model.{field} to the stage-1 run's value.")
    self.embed = Embed(c.vocab_size, c.hidden, c.init_std, dtype=self.dtype)
    self.compress = InputCompression(c, dtype=self.dtype)
    self.transformer = transformer_lib.Transformer(c, dtype=self.dtype)
    self.head = heads.build_head(c, self.dtype, name="head")
    self.autoencoder = Autoencoder(self.ae_config, dtype=self.dtype)

  def _chunk_inputs(self, tokens_BxTK):
    """Token ids [B, T*K] -> compressed chunk inputs x_BxTxD."""
    b, length = tokens_BxTK.shape
    k = self.config.patch_size
    x_BxTKxD = self.embed(jnp.asarray(tokens_BxTK, jnp.int32))
    return self.compress(x_BxTKxD.reshape(b, length // k, k * self.config.hidden))

  def _check_length(self, length):
    k = self.config.patch_size
    if length % k or length < 2 * k:
      raise ValueError(
          f"CALM: the sequence length {length} must be a multiple of config.model.patch_size="
          f"{k} and hold at least 2 chunks; fix config.data.seq_len (or eval.block_len).")

  def hidden_states(self, tokens_BxL):
    """h_Bx(T-1)xD: backbone states of the input chunks 0..T-2; h[:, t] predicts chunk t+1."""
    self._check_length(tokens_BxL.shape[1])
    return self.transformer(self._chunk_inputs(tokens_BxL[:, :-self.config.patch_size]))

  def targets(self, tokens_NxK, train=False):
    """The frozen encoder's posterior (mean_Nxl, log_std_Nxl), float32, no gradient."""
    bf16 = train and self.config.targets_bf16_embeddings_in_training
    mean, log_std = self.autoencoder.encode(jnp.asarray(tokens_NxK, jnp.int32),
                                            bf16_embeddings=bf16)
    return jax.lax.stop_gradient(mean), jax.lax.stop_gradient(log_std)

  def __call__(self, batch, train=False, noise=None, step=None):
    """(loss, metrics): the head's loss averaged over targets with all K tokens real.

    No dropout; the 'sample' rng drives the head in training and eval. noise: the head's
    loss draws (EnergyHead.loss_noise) to use instead of fresh ones (energy head only).
    step: the optimizer step, for the energy exponent's schedule (None: its final value).
    """
    c = self.config
    k = c.patch_size
    tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
    b, length = tokens_BxL.shape
    h_BxT1xD = self.hidden_states(tokens_BxL)
    n = b * (length // k - 1)
    mean_Nxl, log_std_Nxl = self.targets(tokens_BxL[:, k:].reshape(n, k), train)
    # The head's training targets: posterior samples with their std scaled by
    # target_std_scale (1: the reference; 0: the posterior mean itself).
    log_std_Nxl = log_std_Nxl + jnp.log(jnp.float32(c.target_std_scale))
    mask_NxK = jnp.asarray(batch["mask"], jnp.int32)[:, k:].reshape(n, k)
    valid_N = jnp.all(mask_NxK == 1, axis=-1)
    head_kwargs = {} if noise is None else {"noise": noise}
    if c.head == "energy":
      head_kwargs["beta"] = energy_beta(c, step)
    loss_N, metrics_N = self.head.loss(h_BxT1xD.reshape(n, c.hidden), mean_Nxl, log_std_Nxl,
                                       **head_kwargs)
    if self.is_initializing():      # create the frozen decoder's params too
      self.decode_latent(jnp.zeros((1, c.latent_dim), jnp.float32))
    loss = masked_mean(loss_N, valid_N)
    metrics = {name: masked_mean(m_N, valid_N) for name, m_N in metrics_N.items()}
    metrics["loss"] = loss
    metrics["valid_fraction"] = jnp.mean(jnp.asarray(valid_N, jnp.float32))
    if "beta" in head_kwargs and c.beta_anneal_steps and step is not None:
      metrics["energy_beta"] = head_kwargs["beta"]
    return loss, metrics

  def init_cache(self, batch_size, max_chunks):
    """An empty KV cache for max_chunks chunk positions (see transformer.py for the layout)."""
    return transformer_lib.init_cache(self.config, batch_size, max_chunks, self.dtype)

  def extend(self, chunks_BxTxK, cache):
    """Appends T chunks at cache['pos']; returns (h_BxTxD, cache); h[:, -1] predicts the next."""
    b, t, k = chunks_BxTxK.shape
    return self.transformer.extend(self._chunk_inputs(chunks_BxTxK.reshape(b, t * k)), cache)

  def init_branches(self, start=0):
    """Branches from positions start, start+1, ... for the Brier continuations
    (transformer.init_branches)."""
    return transformer_lib.init_branches(self.config, start)

  def extend_branches(self, chunks_BxPxK, cache, branches):
    """Chunk p continues position start + p of the prefilled cache; returns (h_BxPxD, branches)."""
    b, p, k = chunks_BxPxK.shape
    x_BxPxD = self._chunk_inputs(chunks_BxPxK.reshape(b, p * k))
    return self.transformer.extend_branches(x_BxPxD, cache, branches)

  def sample_latent(self, h_xD):
    """One head sample per backbone vector: z [..., l] (rng stream 'sample')."""
    return self.head.sample(h_xD)

  def sample_chunk(self, h_xD):
    """One head sample per backbone vector, decoded by argmax: int32[..., K] (rng 'sample')."""
    return jnp.argmax(self.decode_latent(self.sample_latent(h_xD)), axis=-1).astype(jnp.int32)

  def decode_latent(self, z_xl):
    """The frozen decoder: z [..., l] -> logits [..., K, V]."""
    lead = z_xl.shape[:-1]
    logits = self.autoencoder.decode(jnp.reshape(z_xl, (-1, z_xl.shape[-1])))
    return jax.lax.stop_gradient(logits.reshape(lead + logits.shape[1:]))
