"""Token-level loss helpers shared by the AR baseline and the autoencoder."""
import jax
import jax.numpy as jnp


def cross_entropy(logits_xV, targets):
  """Per-position cross-entropy (float32) and whether the argmax equals the target."""
  logits = jnp.asarray(logits_xV, jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return logz - target_logit, correct


def masked_mean(x, weights):
  """sum(x * w) / max(sum(w), 1) in float32."""
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(jnp.asarray(x, jnp.float32) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
