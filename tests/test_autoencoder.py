"""Tests for calm_jax/models/autoencoder.py (the stage-1 VAE) and build_model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax.models import autoencoder
from calm_jax.stages import build_model
from experiments import autoencoder as ae_experiment

pytestmark = pytest.mark.unit

# unsafe_rbg keys: XLA compiles their random init far faster than threefry on CPU.
RNG = jax.random.key(0, impl="unsafe_rbg")


def rngs(step=0):
  return {"params": RNG, "dropout": jax.random.fold_in(RNG, 2 * step + 1),
          "sample": jax.random.fold_in(RNG, 2 * step + 2)}


def tiny_config(k=4, vocab=32, latent=16, layers=2):
  """The tiny recipe shrunk; 2 + 2 residual layers (the recipe's 0 is tested on its own)."""
  config = ae_experiment.get_config(f"size=tiny,K={k}")
  config.model.update(vocab_size=vocab, hidden=32, mlp=64, latent_dim=latent,
                      encoder_layers=layers, decoder_layers=layers)
  return config


def make_batch(b=2, l=16, vocab=32, seed=0):
  tokens = np.random.RandomState(seed).randint(1, vocab, (b, l)).astype(np.int32)
  return {"tokens": tokens, "mask": np.ones_like(tokens)}


def init(model, batch):
  return jax.jit(lambda r, b: model.init(r, b, train=False))(rngs(), batch)


def numpy_init(model, batch, std=0.02):
  """Variables like init's (normal kernels, unit scales, zero biases) without compiling init."""
  abstract = nn.unbox(jax.eval_shape(lambda r, b: model.init(r, b), rngs(), batch))
  rs = np.random.RandomState(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    return (std * rs.randn(*leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_shapes_and_finite_loss_for_every_k(k):
  model = build_model(tiny_config(k))
  batch = make_batch()
  n = 2 * 16 // k
  v = numpy_init(model, batch)
  loss, metrics = jax.jit(lambda v, b: model.apply(v, b, train=True, rngs=rngs(1)))(v, batch)
  assert np.isfinite(loss) and set(metrics) == {
      "loss", "recon_loss", "kl", "kl_unclipped", "token_accuracy_train"}
  apply = lambda method, *args: jax.eval_shape(lambda: model.apply(v, *args, method=method))
  mean, log_std = apply("encode", batch["tokens"].reshape(n, k))
  assert mean.shape == log_std.shape == (n, 16) and mean.dtype == jnp.float32
  assert apply("decode", jnp.zeros((n, 16))).shape == (n, k, 32)
  params = v["params"]
  assert params["encoder"]["squeeze"]["kernel"].shape == (k * 32, 32)
  assert params["decoder"]["expand"]["kernel"].shape == (32, k * 32)


def test_param_tree_and_logical_names():
  model = build_model(tiny_config())
  v = jax.eval_shape(lambda r, b: model.init(r, b, train=False), rngs(), make_batch())
  spec = nn.get_partition_spec(v)["params"]
  assert set(spec) == {"embed", "encoder", "decoder"}
  assert spec["embed"]["embedding"] == jax.P("vocab", "embed")
  assert spec["encoder"]["to_latent"]["kernel"] == jax.P("embed", "latent")
  assert spec["encoder"]["to_latent"]["bias"] == jax.P("latent")
  assert spec["decoder"]["from_latent"]["kernel"] == jax.P("latent", "embed")
  assert spec["decoder"]["layers_0"]["mlp"]["gate"]["kernel"] == jax.P("embed", "mlp")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(v)))


def test_clipped_kl_matches_formula_and_clip():
  mean = np.array([[0.0, 2.0, 0.1]], np.float32)
  log_std = np.array([[0.0, 0.5, -0.05]], np.float32)
  raw = 0.5 * (mean ** 2 + np.exp(2 * log_std) - 1 - 2 * log_std)
  assert raw[0, 0] < 0.5 and raw[0, 2] < 0.5 and raw[0, 1] > 0.5
  got = autoencoder.clipped_kl(mean, log_std, 0.5)
  np.testing.assert_allclose(got, [0.5 + raw[0, 1] + 0.5], rtol=1e-6)
  np.testing.assert_allclose(autoencoder.clipped_kl(mean, log_std, -np.inf), raw.sum(-1),
                             rtol=1e-6)


def test_token_masking_rate():
  tokens = jnp.full((400, 100), 7, jnp.int32)
  u = jax.random.uniform(jax.random.key(3), tokens.shape)
  masked = autoencoder.mask_tokens(u, tokens, rate=0.15, mask_id=0)
  assert set(np.unique(masked)) == {0, 7}
  assert abs(float(jnp.mean(masked == 0)) - 0.15) < 0.005
  assert bool(jnp.all(autoencoder.mask_tokens(u, tokens, 0.0, 0) == 7))
  # The reference keeps a token iff u > rate: u == rate is masked.
  edge = autoencoder.mask_tokens(jnp.array([0.15, 0.1500001]), jnp.array([7, 7]), 0.15, 0)
  assert edge.tolist() == [0, 7]


def test_padding_carries_no_loss_and_eval_metrics_at_init():
  config = tiny_config()
  model = build_model(config)
  batch = make_batch()
  batch["mask"][:, 10:] = 0              # chunk 2 half padded, chunk 3 all padding
  v = numpy_init(model, batch)
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False, rngs=rngs(5)))
  loss, metrics = apply(v, batch)
  other = dict(batch, tokens=batch["tokens"].copy())
  other["tokens"][:, 12:] = 5            # change only the all-padding chunk
  loss2, metrics2 = apply(v, other)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], metrics2["kl"], rtol=1e-6)
  assert {"token_accuracy", "token_accuracy_sample", "token_accuracy_noise_0.3",
          "token_accuracy_noise_0.5"} <= set(metrics)
  np.testing.assert_allclose(loss, metrics["recon_loss"] * 4 + 1e-3 * metrics["kl"], rtol=1e-5)
  # At init mean ~ 0 and log_std ~ 0, so every dim's KL is below the clip: KL = l * clip.
  np.testing.assert_allclose(metrics["kl"], 16 * config.model.kl_clip, rtol=1e-6)
  assert metrics["kl_unclipped"] < metrics["kl"]


def test_odd_layer_count_is_an_error():
  config = tiny_config()
  config.model.encoder_layers = 3
  with pytest.raises(ValueError, match="encoder_layers"):
    jax.eval_shape(lambda r, b: build_model(config).init(r, b), rngs(), make_batch())


def test_linear_decoder_has_convex_token_regions():
  """decoder_layers=0 (the reference's num_decoder_layers=0): a linear decoder whose token regions are convex.

  Every point between two latents that decode the same token at a position decodes that token
  too, so the average of chunks that share a token keeps it (a head's blob over such chunks
  decodes to what they share); with hidden decoder layers that does not hold.
  """
  config = tiny_config(k=4, vocab=32, latent=16)
  config.model.decoder_layers = 0                  # the encoder keeps its layers
  model = build_model(config)
  batch = make_batch()
  v = numpy_init(model, batch, std=0.5)
  assert not any(name.startswith("layers_") for name in v["params"]["decoder"])
  z = jax.random.normal(jax.random.key(1), (2, 4000, 16))
  decode = jax.jit(lambda z: jnp.argmax(model.apply(v, z, method="decode"), -1))
  ends = np.asarray(decode(z.reshape(-1, 16))).reshape(2, 4000, 4)
  same = ends[0] == ends[1]
  assert 0.02 < same.mean() < 0.5                  # enough shared tokens to test, not trivial
  for w in (0.1, 0.37, 0.5, 0.9):
    mid = np.asarray(decode((1 - w) * z[0] + w * z[1]))
    np.testing.assert_array_equal(mid[same], ends[0][same])


def test_tiny_autoencoder_learns_to_reconstruct():
  config = tiny_config(k=4, vocab=32, latent=16)
  model = build_model(config)
  batch = make_batch(b=8, l=16, seed=1)   # 32 fixed chunks, seen every step
  params = init(model, batch)["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def train(params, opt_state):
    def step(carry, i):
      params, opt_state = carry
      grad_fn = jax.grad(lambda p: model.apply({"params": p}, batch, train=True, rngs=rngs(i))[0])
      updates, opt_state = tx.update(grad_fn(params), opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt_state), jnp.arange(150))[0]

  params, _ = train(params, tx.init(params))
  _, metrics = jax.jit(lambda p: model.apply({"params": p}, batch, rngs=rngs(999)))(params)
  assert metrics["token_accuracy"] >= 0.99, metrics
  assert metrics["token_accuracy_sample"] >= 0.95, metrics
