"""The AR baseline: a token-level Llama-style language model trained by next-token cross-entropy.

Params: 'embed' (token embedding [V, D]), 'transformer' (the shared backbone) and
'lm_head' (an untied output projection [D, V], as in Llama and the paper's
LlamaForCausalLM baseline, whose word embeddings are not tied).
"""
import flax.linen as nn
import jax.numpy as jnp

from calm_jax.models import transformer as transformer_lib
from calm_jax.models.layers import Dense, Embed, constrain
from calm_jax.models.losses import cross_entropy, masked_mean


class ARLanguageModel(nn.Module):
  """Embedding -> causal Transformer -> untied vocab projection."""
  config: object
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embed = Embed(c.vocab_size, c.hidden, c.init_std, dtype=self.dtype)
    self.transformer = transformer_lib.Transformer(c, dtype=self.dtype)
    self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), c.init_std, dtype=self.dtype)

  def _project(self, h_BxLxD):
    return constrain(self.lm_head(h_BxLxD), ("batch", "length", "act_vocab"))

  def project(self, h_BxLxD):
    """Backbone states -> logits_BxLxV (the compute dtype); for chunked consumers (eval)."""
    return self._project(h_BxLxD)

  def logits(self, tokens_BxL):
    """Next-token logits_BxLxV (position i predicts token i+1), in the compute dtype."""
    return self._project(self.transformer(self.embed(tokens_BxL)))

  def __call__(self, batch, train=False):
    """Mean next-token cross-entropy over target positions with mask 1."""
    del train      # no dropout in the baseline
    tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
    logits = self.logits(tokens_BxL[:, :-1])
    ce, correct = cross_entropy(logits, tokens_BxL[:, 1:])
    weights = batch["mask"][:, 1:]
    loss = masked_mean(ce, weights)
    metrics = {"loss": loss, "cross_entropy": loss, "accuracy": masked_mean(correct, weights)}
    return loss, metrics

  def init_cache(self, batch_size, max_len):
    """An empty KV cache for max_len tokens (see transformer.py for the layout)."""
    return transformer_lib.init_cache(self.config, batch_size, max_len, self.dtype)

  def extend(self, tokens_BxT, cache):
    """Appends T tokens at cache['pos']; returns (logits_BxTxV, cache)."""
    h, cache = self.extend_states(tokens_BxT, cache)
    return self._project(h), cache

  def extend_states(self, tokens_BxT, cache):
    """extend without the vocab projection: (h_BxTxD, cache) (`project` gives the logits)."""
    return self.transformer.extend(self.embed(tokens_BxT), cache)

  def init_branches(self, start=0):
    """Branches from positions start, start+1, ... for the Brier continuations
    (transformer.init_branches)."""
    return transformer_lib.init_branches(self.config, start)

  def extend_branches(self, tokens_BxP, cache, branches):
    """Token p continues position start + p of the prefilled cache; returns (h_BxPxD,
    branches) (`project` gives the logits)."""
    return self.transformer.extend_branches(self.embed(tokens_BxP), cache, branches)
