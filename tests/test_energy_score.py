"""Tests of the energy-score estimator: exactness, propriety, and finite gradients at collapse."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.models import energy_score

pytestmark = pytest.mark.unit


def energy_loss(x_NxBxl, y_MxBxl, beta):
  """Per-position energy loss 2 * fidelity - diversity, as the energy head computes it."""
  fidelity_B, diversity_B = energy_score.energy_terms(x_NxBxl, y_MxBxl, beta)
  return 2.0 * fidelity_B - diversity_B


def _double_loop(x_NxBxl, y_MxBxl, beta):
  """The estimator written the slow, obvious way, in float64."""
  x, y = np.asarray(x_NxBxl, np.float64), np.asarray(y_MxBxl, np.float64)
  n, b, _ = x.shape
  m = y.shape[0]
  fidelity, diversity = np.zeros(b), np.zeros(b)
  for p in range(b):
    for i in range(n):
      for j in range(m):
        fidelity[p] += np.linalg.norm(x[i, p] - y[j, p]) ** beta / (n * m)
      for j in range(n):
        if i != j:
          diversity[p] += np.linalg.norm(x[i, p] - x[j, p]) ** beta / (n * (n - 1))
  return 2 * fidelity - diversity, fidelity, diversity


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
def test_matches_double_loop(beta):
  rng = np.random.default_rng(int(beta * 10))
  # A large common offset checks that the Gram-trick cross term stays accurate.
  x = rng.normal(size=(5, 3, 7)) + 20.0
  y = rng.normal(size=(11, 3, 7)) * 0.7 + 20.3
  want, want_fid, want_div = _double_loop(x, y, beta)
  got = energy_loss(jnp.asarray(x), jnp.asarray(y), beta)
  fid, div = energy_score.energy_terms(jnp.asarray(x), jnp.asarray(y), beta)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fid, want_fid, rtol=1e-4)
  np.testing.assert_allclose(div, want_div, rtol=1e-4)


def test_true_distribution_scores_best():
  """Expected loss: matching samples < shifted, too narrow (collapsed) or too wide."""
  key = jax.random.PRNGKey(0)
  b, l, n, m = 4000, 4, 8, 100
  mean = jnp.linspace(-1.0, 1.0, l)
  std = jnp.array([0.5, 1.0, 0.3, 0.8])
  ky, kx = jax.random.split(key)
  y = mean + std * jax.random.normal(ky, (m, b, l))
  eps = jax.random.normal(kx, (n, b, l))
  candidates = {
      "true": mean + std * eps,
      "shifted": mean + 0.3 + std * eps,
      "collapsed": jnp.broadcast_to(mean, (n, b, l)),
      "narrow": mean + 0.5 * std * eps,
      "wide": mean + 1.5 * std * eps,
  }
  scores = {k: float(energy_loss(v, y, 1.0).mean()) for k, v in candidates.items()}
  for name, score in scores.items():
    if name != "true":
      assert scores["true"] < score, scores


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
def test_gradient_finite_when_samples_coincide(beta):
  """Step 0 of a zero-initialised head: all N samples are identical (and may equal a y_j)."""
  y = jax.random.normal(jax.random.PRNGKey(1), (6, 2, 3))
  y = y.at[0].set(0.0)       # a target sample that coincides with the model samples

  def loss(offset):
    x = jnp.zeros((4, 2, 3)) + offset
    return energy_loss(x, y, beta).mean()

  value, grad = jax.value_and_grad(loss)(jnp.zeros((3,)))
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))
  assert np.any(grad != 0)   # the fidelity term still pulls the samples towards y


def test_needs_two_model_samples():
  with pytest.raises(ValueError, match="num_model_samples"):
    energy_loss(jnp.zeros((1, 2, 3)), jnp.zeros((4, 2, 3)), 1.0)


def test_memory_stays_below_the_direct_difference_tensor():
  """No [N, M, B, l] difference: the compiled loss+grad needs far less scratch than one."""
  n, m, b, l = 8, 100, 256, 64
  x = jax.ShapeDtypeStruct((n, b, l), jnp.float32)
  y = jax.ShapeDtypeStruct((m, b, l), jnp.float32)
  grad_fn = jax.jit(jax.value_and_grad(lambda x, y: energy_loss(x, y, 1.0).mean()))
  memory = grad_fn.lower(x, y).compile().memory_analysis()
  if memory is None:
    pytest.skip("this backend reports no memory analysis")
  direct_bytes = n * m * b * l * 4
  assert memory.temp_size_in_bytes < direct_bytes / 2, (memory.temp_size_in_bytes, direct_bytes)
