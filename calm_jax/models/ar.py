"""The AR baseline: a token-level Llama-style language model trained by next-token cross-entropy.

Params: 'embed' (token embedding [V, D]), 'transformer' (the shared backbone) and
'lm_head' (an untied output projection [D, V], as in Llama and the paper's
LlamaForCausalLM baseline, whose word embeddings are not tied).

The loss projects and scores config.model.logits_chunk positions at a time
(losses.map_chunks, rematerialised in the backward pass): the float32 [B, L, V] logits of
a whole batch never exist at once (4 GB per 8 x 2048 tokens at V = 128k).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import transformer as transformer_lib
from calm_jax.models.layers import Dense, Embed, constrain
from calm_jax.models.losses import cross_entropy, map_chunks, masked_mean


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

  def _lm_kernel(self):
    """The lm_head kernel [D, V] as an array (for projections inside lax loops)."""
    if self.is_initializing():
      self.lm_head(jnp.zeros((1, 1, self.config.hidden), self.dtype))
    return nn.unbox(self.lm_head.variables["params"]["kernel"])

  def __call__(self, batch, train=False, step=None):
    """Mean next-token cross-entropy over target positions with mask 1."""
    del train, step      # no dropout in the baseline, no loss schedule
    tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
    h_BxLxD = self.transformer(self.embed(tokens_BxL[:, :-1]))
    kernel_DxV = jnp.asarray(self._lm_kernel(), self.dtype)

    def chunk(xs):
      logits = jax.lax.dot_general(jnp.asarray(xs["h"], self.dtype), kernel_DxV,
                                   (((2,), (0,)), ((), ())))
      ce, correct = cross_entropy(constrain(logits, ("batch", "length", "act_vocab")), xs["y"])
      return {"ce": ce, "correct": correct}

    out = map_chunks(chunk, {"h": h_BxLxD, "y": tokens_BxL[:, 1:]}, self.config.logits_chunk)
    ce, correct = out["ce"], out["correct"]
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
