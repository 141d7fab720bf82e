"""Tests of the generative heads: each learns a toy 2-D conditional Gaussian; step 0 is finite."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from calm_jax.models import heads

pytestmark = pytest.mark.unit

# Four conditions, each a fixed random backbone state with its own 2-D target Gaussian.
TOY_MEAN = np.array([[1.5, -1.0], [-1.0, 0.5], [0.0, 2.0], [2.0, 2.0]], np.float32)
TOY_STD = np.array([[0.3, 0.8], [0.6, 0.2], [1.0, 0.5], [0.4, 0.4]], np.float32)
HIDDEN = 32


def _config(head):
  return ml_collections.ConfigDict(dict(
      head=head, hidden=HIDDEN, head_hidden=0, latent_dim=2, num_head_blocks=2, layer_norm_eps=1e-6, init_std=0.02,
      noise_dim=16, num_model_samples=8, num_target_samples=32, beta=1.0,
      head_batch_mul=4, flow_steps=8, diffusion_train_steps=1000, diffusion_sample_steps=50))


def _toy_batch(repeats=16):
  states = np.random.default_rng(0).normal(size=(4, HIDDEN)).astype(np.float32)
  c = np.tile(np.arange(4), repeats)
  return states, (jnp.asarray(states[c]), jnp.asarray(TOY_MEAN[c]),
                  jnp.asarray(np.log(TOY_STD[c])))


def _init(head, batch, unbox=True):
  """Jitted init (eager init of these heads takes several times longer on CPU)."""
  rngs = {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}
  params = jax.jit(functools.partial(head.init, method="loss"))(rngs, *batch)["params"]
  return nn.unbox(params) if unbox else params


@pytest.mark.parametrize("name", ["energy", "flow", "diffusion"])
def test_head_learns_toy_conditional_gaussian(name):
  """Step 0 is finite despite the zero-initialised output; 400 Adam steps match the targets."""
  steps = 400
  head = heads.build_head(_config(name), jnp.float32)
  states, batch = _toy_batch()
  params = _init(head, batch)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  opt_state = tx.init(params)
  sample = jax.jit(functools.partial(head.apply, method="sample"))

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      loss_N, metrics = head.apply({"params": p}, *batch, method="loss", rngs={"sample": key})
      return loss_N.mean(), metrics
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics, optax.tree.norm(grads)

  if name == "energy":   # zero-initialised last layer: all samples coincide at step 0
    z0 = sample({"params": params}, batch[0], rngs={"sample": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(z0, 0.0)
  for i in range(steps):
    params, opt_state, loss, metrics, grad_norm = train_step(
        params, opt_state, jax.random.PRNGKey(100 + i))
    if i == 0:
      assert np.isfinite(loss) and np.isfinite(grad_norm) and grad_norm > 0
      assert all(np.all(np.isfinite(m)) for m in metrics.values())
      if name == "energy":
        assert set(metrics) == {"energy_loss", "fidelity", "diversity", "sample_to_mean"}
        np.testing.assert_allclose(metrics["diversity"], 0.0)
        np.testing.assert_allclose(metrics["energy_loss"], 2 * metrics["fidelity"], rtol=1e-6)
      else:
        assert set(metrics) == {f"{name}_loss"}

  h_CxSxD = jnp.asarray(np.repeat(states[:, None], 1000, axis=1))
  z_CxSxl = np.asarray(sample({"params": params}, h_CxSxD, rngs={"sample": jax.random.PRNGKey(7)}))
  assert z_CxSxl.shape == (4, 1000, 2)
  # The conditions' means are >= 1 apart, so this also checks that the head is conditional.
  np.testing.assert_allclose(z_CxSxl.mean(1), TOY_MEAN, atol=0.1)
  ratio = z_CxSxl.std(1) / TOY_STD
  assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


@pytest.mark.parametrize("name", ["energy", "flow", "diffusion"])
def test_bfloat16_compute_keeps_float32_params(name):
  head = heads.build_head(_config(name), jnp.bfloat16)
  _, batch = _toy_batch(repeats=1)
  params = _init(head, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rngs = {"sample": jax.random.PRNGKey(0)}
  loss_N, _ = jax.jit(functools.partial(head.apply, method="loss"))(
      {"params": params}, *batch, rngs=rngs)
  z = jax.jit(functools.partial(head.apply, method="sample"))({"params": params}, batch[0],
                                                              rngs=rngs)
  assert loss_N.dtype == jnp.float32 and z.dtype == jnp.float32
  assert np.all(np.isfinite(loss_N)) and np.all(np.isfinite(z))


def test_params_carry_logical_axis_names():
  for name in ("energy", "flow", "diffusion"):
    head = heads.build_head(_config(name), jnp.float32)
    _, batch = _toy_batch(repeats=1)
    boxed = _init(head, batch, unbox=False)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves)
    for x in leaves:   # a kernel never names the same mesh axis twice
      named = [n for n in x.names if n is not None]
      assert len(named) == len(set(named)), (name, x.names)


def test_unknown_head_is_a_clear_error():
  with pytest.raises(ValueError, match="config.model.head"):
    heads.build_head(_config("gan"), jnp.float32)
