"""Tests for calm_jax/models/calm.py: shapes, masking, frozen autoencoder, KV-cache consistency."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.stages import build_model
from experiments import autoencoder as ae_experiment
from experiments import calm as calm_experiment

pytestmark = pytest.mark.unit

# unsafe_rbg keys: XLA compiles their random init far faster than threefry on CPU.
RNG = jax.random.key(0, impl="unsafe_rbg")
VOCAB, LATENT, HIDDEN = 32, 8, 32


def rngs(step=0):
  return {"params": RNG, "dropout": jax.random.fold_in(RNG, 2 * step + 1),
          "sample": jax.random.fold_in(RNG, 2 * step + 2)}


def configs(k=4, head="energy"):
  ae = ae_experiment.get_config(f"size=tiny,K={k}")
  ae.model.update(vocab_size=VOCAB, hidden=16, mlp=32, latent_dim=LATENT)
  config = calm_experiment.get_config(f"size=tiny,K={k},head={head}")
  config.model.update(vocab_size=VOCAB, hidden=HIDDEN, mlp=64, layers=2, heads=4, kv_heads=2,
                      latent_dim=LATENT, num_head_blocks=1, noise_dim=8, num_target_samples=16,
                      flow_steps=2, diffusion_train_steps=100, diffusion_sample_steps=4)
  return config, ae.model


def make_batch(b=2, l=16, seed=0):
  tokens = np.random.RandomState(seed).randint(1, VOCAB, (b, l)).astype(np.int32)
  return {"tokens": tokens, "mask": np.ones_like(tokens)}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_loss_metrics_and_gradients(k):
  config, ae_model_config = configs(k)
  model = build_model(config, ae_model_config)
  batch = make_batch()

  @jax.jit
  def run(batch):
    params = nn.unbox(model.init(rngs(), batch, train=False))["params"]
    loss_fn = lambda p: model.apply({"params": p}, batch, train=True, rngs=rngs(1))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    h = model.apply({"params": params}, batch["tokens"], method="hidden_states")
    z = model.apply({"params": params}, h, method="sample_latent", rngs=rngs(2))
    logits = model.apply({"params": params}, z, method="decode_latent")
    return params, loss, metrics, grads, h, z, logits

  params, loss, metrics, grads, h, z, logits = run(batch)
  t = 16 // k
  assert set(params) == {"embed", "compress", "transformer", "head", "autoencoder"}
  assert set(params["autoencoder"]) == {"embed", "encoder", "decoder"}
  assert h.shape == (2, t - 1, HIDDEN) and z.shape == (2, t - 1, LATENT)
  assert logits.shape == (2, t - 1, k, VOCAB)
  assert set(metrics) == {"loss", "energy_loss", "fidelity", "diversity", "sample_to_mean",
                          "valid_fraction"}
  assert np.isfinite(loss) and loss == metrics["loss"] == metrics["energy_loss"]
  assert all(np.isfinite(v) for v in metrics.values())
  # Step 0: the zero-initialised head gives identical samples; gradients are still finite.
  np.testing.assert_allclose(metrics["diversity"], 0.0)
  trainable = {key: v for key, v in grads.items() if key != "autoencoder"}
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(trainable))
  assert any(np.any(g != 0) for g in jax.tree.leaves(trainable["head"]))
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["autoencoder"]))


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_other_heads(head):
  config, ae_model_config = configs(2, head)
  model = build_model(config, ae_model_config)
  batch = make_batch()

  @jax.jit
  def run(batch):
    params = model.init(rngs(), batch, train=False)["params"]
    loss, metrics = model.apply({"params": params}, batch, train=True, rngs=rngs(1))
    h = model.apply({"params": params}, batch["tokens"], method="hidden_states")
    return loss, metrics, model.apply({"params": params}, h, method="sample_latent",
                                      rngs=rngs(2))

  loss, metrics, z = run(batch)     # (the heads' gradients are tested in test_heads.py)
  assert np.isfinite(loss) and loss == metrics[f"{head}_loss"]
  assert z.shape == (2, 7, LATENT) and np.all(np.isfinite(z))


def test_invalid_targets_carry_no_loss():
  """Targets with any padded token are skipped: their tokens do not move the loss."""
  config, ae_model_config = configs(2)
  model = build_model(config, ae_model_config)
  batch = make_batch()
  batch["mask"][0, -1] = 0                 # row 0: its last target chunk is not full
  batch["mask"][1, 10:] = 0                # row 1: padding from chunk 5 on

  @jax.jit
  def run(params, batch):
    return model.apply(params, batch, train=False, rngs=rngs(1))

  params = jax.jit(lambda b: model.init(rngs(), b, train=False))(batch)
  loss, metrics = run(params, batch)
  np.testing.assert_allclose(metrics["valid_fraction"], (6 + 4) / 14)
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][0, -2:] = (changed["tokens"][0, -2:] + 1) % VOCAB   # an invalid target
  np.testing.assert_array_equal(run(params, changed)[0], loss)
  changed["tokens"][0, 2:4] = (changed["tokens"][0, 2:4] + 1) % VOCAB   # a valid target
  assert run(params, changed)[0] != loss


def test_target_std_scale_scales_the_posterior_noise_of_the_targets():
  """scale s with draws eps == scale 1 with draws s * eps; s = 0: the posterior mean (eps unused)."""
  config, ae_model_config = configs(2)
  batch = make_batch()
  n = 2 * (16 // 2 - 1)

  def loss(scale, eps_scale, eps_seed):
    config.model.target_std_scale = scale
    model = build_model(config, ae_model_config)
    params = jax.jit(lambda b: model.init(rngs(), b, train=False))(batch)
    params = jax.tree.map(lambda p: p + 0.05, params)    # a head that does not start at zero
    noise = {"u": jax.random.uniform(RNG, (config.model.num_model_samples, n,
                                           config.model.noise_dim), minval=-0.5, maxval=0.5),
             "eps": eps_scale * jax.random.normal(jax.random.fold_in(RNG, eps_seed),
                                                  (config.model.num_target_samples, n, LATENT))}
    return model.apply(params, batch, train=True, noise=noise, rngs=rngs(1))[0]

  np.testing.assert_allclose(loss(0.5, 1.0, 0), loss(1.0, 0.5, 0), rtol=1e-5)
  np.testing.assert_allclose(loss(0.0, 1.0, 0), loss(1.0, 0.0, 0), rtol=1e-5)
  np.testing.assert_allclose(loss(0.0, 1.0, 0), loss(0.0, 1.0, 1), rtol=1e-6)
  assert abs(loss(1.0, 1.0, 0) - loss(1.0, 1.0, 1)) > 1e-4


def test_energy_exponent_anneals_from_beta_start_to_beta():
  """The loss at optimizer step s equals the loss with the constant exponent energy_beta(s)."""
  config, ae_model_config = configs(2)
  batch = make_batch()

  def loss(beta, beta_start, anneal, step):
    config.model.update(beta=beta, beta_start=beta_start, beta_anneal_steps=anneal)
    model = build_model(config, ae_model_config)
    params = jax.jit(lambda b: model.init(rngs(), b, train=False))(batch)
    return model.apply(params, batch, train=True, step=step, rngs=rngs(1))

  constant = lambda beta: loss(beta, beta, 0, None)[0]
  assert loss(0.5, 1.5, 10, 0)[1]["energy_beta"] == 1.5
  np.testing.assert_allclose(loss(0.5, 1.5, 10, 0)[0], constant(1.5), rtol=1e-6)
  np.testing.assert_allclose(loss(0.5, 1.5, 10, jnp.int32(4))[0], constant(1.1), rtol=1e-6)
  np.testing.assert_allclose(loss(0.5, 1.5, 10, 25)[0], constant(0.5), rtol=1e-6)
  np.testing.assert_allclose(loss(0.5, 1.5, 10, None)[0], constant(0.5), rtol=1e-6)  # eval
  assert "energy_beta" not in loss(0.5, 0.5, 0, 3)[1]
  assert abs(constant(1.5) - constant(0.5)) > 1e-3


def test_extend_matches_hidden_states():
  config, ae_model_config = configs(2)
  model = build_model(config, ae_model_config)
  batch = make_batch(l=12)
  chunks_BxTxK = batch["tokens"].reshape(2, 6, 2)[:, :-1]     # the 5 input chunks

  @jax.jit
  def run(batch):
    params = model.init(rngs(), batch, train=False)
    h_full = model.apply(params, batch["tokens"], method="hidden_states")
    cache = model.init_cache(2, 8)
    extend = functools.partial(model.apply, params, method="extend")
    h_first, cache = extend(chunks_BxTxK[:, :2], cache)      # a 2-chunk prompt
    steps = [h_first]
    for t in range(2, 5):                                     # then one chunk at a time
      h_t, cache = extend(chunks_BxTxK[:, t:t + 1], cache)
      steps.append(h_t)
    return h_full, jnp.concatenate(steps, axis=1), cache["pos"]

  h_full, h_steps, pos = run(batch)
  assert h_full.shape == h_steps.shape == (2, 5, HIDDEN) and int(pos) == 5
  np.testing.assert_allclose(h_steps, h_full, atol=2e-5, rtol=1e-4)


def test_mismatched_autoencoder_is_a_clear_error():
  config, ae_model_config = configs(4)
  ae_model_config.patch_size = 2
  model = build_model(config, ae_model_config)
  with pytest.raises(ValueError, match="config.model.patch_size"):
    model.init(rngs(), make_batch(), train=False)
