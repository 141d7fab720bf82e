"""Tests for calm_jax/models/ar.py (the AR baseline) and build_model for stage 'ar'."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.stages import build_model
from calm_jax.models.losses import cross_entropy
from experiments import ar_baseline

pytestmark = pytest.mark.unit

# unsafe_rbg keys: XLA compiles their random init far faster than threefry on CPU.
RNG = jax.random.key(0, impl="unsafe_rbg")


def _with_chunk(logits_chunk, scan_layers=True):
  config = ar_baseline.get_config("size=tiny")
  config.model.update(vocab_size=48, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2,
                      scan_layers=scan_layers, init_std=0.02, logits_chunk=logits_chunk)
  return config


def tiny_model(scan_layers=True):
  return build_model(_with_chunk(0, scan_layers))


def make_batch(b=2, l=9, seed=0):
  tokens = np.random.RandomState(seed).randint(0, 48, (b, l)).astype(np.int32)
  return {"tokens": tokens, "mask": np.ones_like(tokens)}


def test_loss_is_masked_next_token_cross_entropy():
  model = tiny_model()
  batch = make_batch()
  batch["mask"][1, 5:] = 0

  @jax.jit
  def run(batch):
    v = model.init({"params": RNG}, batch, train=False)
    return v, model.apply(v, batch, train=True), model.apply(v, batch["tokens"], method="logits")

  v, (loss, metrics), logits = run(batch)
  assert logits.shape == (2, 9, 48)
  ce, correct = cross_entropy(logits[:, :-1], batch["tokens"][:, 1:])
  w = batch["mask"][:, 1:]
  np.testing.assert_allclose(loss, np.sum(ce * w) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.sum(correct * w) / w.sum(), rtol=1e-5)
  assert set(metrics) == {"loss", "cross_entropy", "accuracy"}
  # Uniform-ish logits at init: the loss is close to log V.
  assert abs(float(loss) - np.log(48)) < 0.2
  spec = nn.get_partition_spec(v)["params"]
  assert set(spec) == {"embed", "transformer", "lm_head"}
  assert spec["embed"]["embedding"] == jax.P("vocab", "embed")
  assert spec["lm_head"]["kernel"] == jax.P("embed", "vocab")


def test_chunked_loss_equals_whole_logits_loss_and_gradients():
  """logits_chunk=3 over 8 target positions (chunks of 3, 3, 2+padding) gives the loss and
  gradients of the unchunked loss, and no [B, L, V] logits array is formed."""
  batch = make_batch(b=2, l=9)
  model, chunked = tiny_model(), build_model(_with_chunk(3))
  v = nn.unbox(jax.jit(model.init)({"params": RNG}, batch))

  def loss_and_grads(m):
    return jax.jit(jax.value_and_grad(lambda p: m.apply(p, batch)[0]))(v)

  (loss, grads), (loss_c, grads_c) = loss_and_grads(model), loss_and_grads(chunked)
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  jaxpr = jax.make_jaxpr(lambda p: chunked.apply(p, batch)[0])(v)
  shapes = [tuple(var.aval.shape) for e in jaxpr.jaxpr.eqns for var in e.outvars]
  assert (2, 8, 48) not in shapes


def test_extend_equals_logits():
  model = tiny_model()
  tokens = make_batch(l=8)["tokens"]
  cache = model.init_cache(2, 12)           # no params needed
  assert cache["layers"][0]["k"].shape == (2, 12, 2, 8) and len(cache["layers"]) == 2

  @jax.jit
  def run(tokens, cache):
    v = model.init({"params": RNG}, make_batch(), train=False)    # the same program as above
    full = model.apply(v, tokens, method="logits")
    steps, (out, cache) = [], model.apply(v, tokens[:, :5], cache, method="extend")
    steps.append(out)
    for t in range(5, 8):
      out, cache = model.apply(v, tokens[:, t:t + 1], cache, method="extend")
      steps.append(out)
    return full, jnp.concatenate(steps, axis=1), cache["pos"]

  full, stepped, pos = run(tokens, cache)
  assert int(pos) == 8
  np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-5)

