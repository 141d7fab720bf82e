"""Token-level loss helpers shared by the AR baseline and the autoencoder, and a map over position chunks."""
import jax
import jax.numpy as jnp


def cross_entropy(logits_xV, targets):
  """Per-position cross-entropy (float32) and whether the argmax equals the target."""
  logits = jnp.asarray(logits_xV, jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return logz - target_logit, correct


def map_chunks(fn, xs, chunk):
  """fn over chunks of `chunk` positions of xs (axis 1 of every [B, P, ...] leaf), one at a time.

  fn(xs_chunk) returns a tree of [B, C, ...] arrays; the result holds them for all P
  positions. Chunks run in a lax.map of jax.checkpoint(fn): only one chunk's temporaries
  (e.g. its [B, C, V] float32 logits) exist at once, and a backward pass recomputes each
  chunk instead of saving it. P is zero-padded to a multiple of chunk (padded positions are
  cut from the outputs). chunk <= 0 or >= P: fn(xs) on everything at once.
  """
  p = jax.tree.leaves(xs)[0].shape[1]
  if chunk <= 0 or chunk >= p:
    return fn(xs)
  n = -(-p // chunk)

  def split(a):
    a = jnp.pad(a, [(0, 0), (0, n * chunk - p)] + [(0, 0)] * (a.ndim - 2))
    return jnp.swapaxes(a.reshape((a.shape[0], n, chunk) + a.shape[2:]), 0, 1)

  def merge(a):
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape((a.shape[0], n * chunk) + a.shape[3:])[:, :p]

  return jax.tree.map(merge, jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, xs)))


def masked_mean(x, weights):
  """sum(x * w) / max(sum(w), 1) in float32."""
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(jnp.asarray(x, jnp.float32) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
