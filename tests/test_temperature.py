"""Tests of likelihood-free temperature sampling against p^(1/T) on a toy categorical over 2-token outcomes."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln

from calm_jax.sampling import temperature
from tests import jaxpr_walk

pytestmark = pytest.mark.unit

# Six outcomes of K = 2 tokens; several share a first token, so equality must use both tokens.
P_M = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
OUTCOMES_MxK = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [0, 2]], np.int32)
BATCH = 4000
# Chi-square critical value for 5 degrees of freedom at p = 1e-5 (seeds are fixed, so this never flakes).
CHI2_CRIT_5DOF = 28.5


def _make_draw(batch):
  """draw(rng, num) -> int32[num, batch, 2]: i.i.d. outcomes of P_M (inverse CDF: fast to compile)."""
  cdf_M = jnp.asarray(np.cumsum(P_M)[:-1], jnp.float32)

  def draw(rng, num):
    u_NxB = jax.random.uniform(rng, (num, batch))
    index_NxB = jnp.sum(u_NxB[..., None] >= cdf_M, axis=-1)
    return jnp.asarray(OUTCOMES_MxK)[index_NxB]
  return draw


_draw = _make_draw(BATCH)


def _outcome_index(tokens_BxK):
  tokens_BxK = np.asarray(tokens_BxK)
  lookup = {tuple(o): i for i, o in enumerate(OUTCOMES_MxK)}
  return np.array([lookup[tuple(t)] for t in tokens_BxK])


def _tempered(power):
  q = P_M ** power
  return q / q.sum()


def _chi2(index_B, expected_M):
  counts = np.bincount(index_B, minlength=len(expected_M))
  want = expected_M * len(index_B)
  return float(np.sum((counts - want) ** 2 / want))


def test_split_inverse_temperature():
  assert temperature.split_inverse_temperature(1.0) == (1, 0.0)
  assert temperature.split_inverse_temperature(1 / 3) == (3, 0.0)
  n, alpha = temperature.split_inverse_temperature(0.4)
  assert n == 2 and alpha == pytest.approx(0.5)
  n, alpha = temperature.split_inverse_temperature(0.7)
  assert n == 1 and alpha == pytest.approx(1 / 0.7 - 1)
  with pytest.raises(ValueError, match="temperature"):
    temperature.split_inverse_temperature(1.5)


# One compiled program for every temperature: (n, alpha) are traced.
_sample_exact_power = jax.jit(lambda rng, n, alpha: temperature.sample_exact_power(
    _draw, rng, n, alpha, max_draws=4096, draws_per_step=8, fallback_pool=64))


@pytest.mark.parametrize("temp", [1.0, 1 / 2, 1 / 3, 0.7, 0.4])
def test_exact_sampler_matches_tempered_distribution(temp):
  n, alpha = temperature.split_inverse_temperature(temp)
  if temp == 1.0:
    tokens_BxK, stats = jax.jit(lambda rng: temperature.sample_exact(
        _draw, rng, temp, max_draws=4096, draws_per_step=8, fallback_pool=64))(jax.random.PRNGKey(17))
  else:
    tokens_BxK, stats = _sample_exact_power(jax.random.PRNGKey(17), n, alpha)
  assert int(stats["num_fallbacks"]) == 0
  chi2 = _chi2(_outcome_index(tokens_BxK), _tempered(1 / temp))
  assert chi2 < CHI2_CRIT_5DOF, (temp, chi2)
  num_draws_B = np.asarray(stats["num_draws"])
  if temp == 1.0:
    assert (num_draws_B == 1).all()
  else:
    assert (num_draws_B >= n + (alpha > 0)).all()


def test_exact_sampler_is_sensitive():
  """The chi-square check above rejects the neighbouring temperatures (e.g. a factory that ignored alpha)."""
  tokens_BxK, _ = _sample_exact_power(jax.random.PRNGKey(17), 1, 0.4286)   # T = 0.7
  index_B = _outcome_index(tokens_BxK)
  assert _chi2(index_B, _tempered(1 / 0.7)) < CHI2_CRIT_5DOF
  assert _chi2(index_B, _tempered(1.0)) > 5 * CHI2_CRIT_5DOF
  assert _chi2(index_B, _tempered(2.0)) > 5 * CHI2_CRIT_5DOF


def test_exact_sampler_without_fallback_pool_bias():
  """The fallback approximation is a real temperature-1/2 rule: pool of 1 = a plain draw."""
  fn = jax.jit(lambda rng: temperature.sample_exact(
      _draw, rng, 1 / 3, max_draws=1, draws_per_step=1, fallback_pool=1))
  tokens_BxK, stats = fn(jax.random.PRNGKey(3))
  # Three agreeing draws cannot happen within one draw: every sequence falls back.
  assert int(stats["num_fallbacks"]) == BATCH
  assert np.asarray(stats["fallback"]).all()
  assert (np.asarray(stats["num_draws"]) == 1).all()
  assert _chi2(_outcome_index(tokens_BxK), P_M) < CHI2_CRIT_5DOF


def test_fallback_count_with_small_cap():
  fn = jax.jit(lambda rng: temperature.sample_exact(
      _draw, rng, 1 / 3, max_draws=6, draws_per_step=3, fallback_pool=6))
  tokens_BxK, stats = fn(jax.random.PRNGKey(5))
  fallback_B = np.asarray(stats["fallback"])
  num_draws_B = np.asarray(stats["num_draws"])
  assert 0 < int(stats["num_fallbacks"]) < BATCH
  assert int(stats["num_fallbacks"]) == fallback_B.sum()
  assert (num_draws_B[fallback_B] == 6).all()
  assert (num_draws_B[~fallback_B] <= 6).all()
  _outcome_index(tokens_BxK)   # every output is a real outcome


def _rule_probs(counts_RxM, n):
  """Selection probabilities of the batch rule given outcome counts, brute force in numpy."""
  m = np.minimum(n, counts_RxM.max(-1, keepdims=True))
  log_w = np.where(counts_RxM >= m,
                   gammaln(counts_RxM + 1) - gammaln(m + 1) - gammaln(np.maximum(counts_RxM - m, 0) + 1),
                   -np.inf)
  w = np.exp(log_w - log_w.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def test_pool_select_matches_rule_on_same_pools():
  """pool_select's choices follow C(count, m) weights, pool by pool (checked against numpy counting)."""
  pool, n = 24, 3
  samples_SxBxK = _draw(jax.random.PRNGKey(0), pool)
  tokens_BxK, level_B = jax.jit(temperature.pool_select, static_argnums=2)(
      jax.random.PRNGKey(1), samples_SxBxK, n)
  index_SxB = np.stack([_outcome_index(s) for s in np.asarray(samples_SxBxK)])
  counts_BxM = np.stack([np.bincount(index_SxB[:, b], minlength=len(P_M)) for b in range(BATCH)])
  np.testing.assert_array_equal(np.asarray(level_B), np.minimum(n, counts_BxM.max(-1)))
  expected_M = _rule_probs(counts_BxM, n).mean(0)
  assert _chi2(_outcome_index(tokens_BxK), expected_M) < CHI2_CRIT_5DOF


def test_pool_select_cascade():
  """No outcome repeated n times: falls back to the largest count; a unique winner is always chosen."""
  # Pool per sequence (S = 4, K = 1): seq 0 = a a b c (n = 3 -> level 2, only 'a' eligible);
  # seq 1 = all distinct (level 1, uniform); seq 2 = d d d e (level 3, 'd').
  pools_BxS = np.array([[5, 5, 6, 7], [1, 2, 3, 4], [9, 9, 9, 8]], np.int32)
  samples_SxBxK = jnp.asarray(pools_BxS.T[:, :, None])
  picks = collections.Counter()
  select = jax.jit(temperature.pool_select, static_argnums=2)
  for seed in range(40):
    tokens_BxK, level_B = select(jax.random.PRNGKey(seed), samples_SxBxK, 3)
    np.testing.assert_array_equal(np.asarray(level_B), [2, 1, 3])
    tokens = np.asarray(tokens_BxK)[:, 0]
    assert tokens[0] == 5 and tokens[2] == 9
    picks[int(tokens[1])] += 1
  assert set(picks) == {1, 2, 3, 4}


@pytest.mark.parametrize("n", [2, 3])
def test_batch_approx_bias_vanishes_with_pool_size(n):
  """Measured bias (total variation to p^n / Z) of the batch rule on P_M, exact up to MC error.

  Measured (100k pools): T=1/2: S=16 0.035, 64 0.011, 256 0.0024, 1024 0.0007;
  T=1/3: S=16 0.093, 64 0.030, 256 0.0084, 1024 0.0021 -- about 1/S; rare outcomes over-represented.
  """
  rng = np.random.default_rng(0)
  target = _tempered(n)
  tvs = []
  for pool in [16, 64, 256, 1024]:
    counts = rng.multinomial(pool, P_M, size=20000)
    tvs.append(0.5 * np.abs(_rule_probs(counts, n).mean(0) - target).sum())
  assert tvs[0] > tvs[1] > tvs[2] > tvs[3]
  assert tvs[3] < 0.005
  assert tvs[0] > 0.02   # the bias is real at small pools


@pytest.mark.parametrize("temp,tv_bound", [(1 / 2, 0.03), (1 / 3, 0.04)])
def test_sample_batch_approx_close_in_practice(temp, tv_bound):
  """The jitted batch sampler at S = 96 lands near p^(1/T) (bias ~0.008 / 0.02 TV plus sampling noise)."""
  batch = 2000
  fn = jax.jit(lambda rng: temperature.sample_batch_approx(_make_draw(batch), rng, temp, 96))
  tokens_BxK, stats = fn(jax.random.PRNGKey(2))
  freq = np.bincount(_outcome_index(tokens_BxK), minlength=len(P_M)) / batch
  assert 0.5 * np.abs(freq - _tempered(1 / temp)).sum() < tv_bound
  assert int(stats["num_fallbacks"]) == 0   # p_max = 0.4: a triple always occurs in 96 draws
  with pytest.raises(ValueError, match="T = 1/n"):
    temperature.sample_batch_approx(_draw, jax.random.PRNGKey(0), 0.4, 16)


def test_temperature_one_is_one_draw():
  rng = jax.random.PRNGKey(4)
  tokens_BxK, _ = jax.jit(lambda r: temperature.sample_batch_approx(_draw, r, 1.0, 64))(rng)
  np.testing.assert_array_equal(tokens_BxK, jax.jit(lambda r: _draw(r, 1)[0])(rng))
  tokens2_BxK, stats2 = jax.jit(lambda r: temperature.sample_exact(
      _draw, r, 1.0, max_draws=8, draws_per_step=1, fallback_pool=1))(rng)
  np.testing.assert_array_equal(tokens2_BxK, tokens_BxK)
  assert (np.asarray(stats2["num_draws"]) == 1).all() and int(stats2["num_fallbacks"]) == 0


def test_exact_sampler_writes_its_pool_in_place():
  """The fallback pool is only ever written by dynamic_update_slice inside the loop: no
  select between the old and the updated pool (a copy of the pool per iteration, as before)."""
  jaxpr = jax.make_jaxpr(lambda r: temperature.sample_exact(
      _make_draw(3), r, 0.4, max_draws=64, draws_per_step=8, fallback_pool=32))(jax.random.key(0))
  pool_shapes = {(32, 3, 2), (40, 3, 2)}
  selects = [e for e in jaxpr_walk.eqns(jaxpr.jaxpr) if e.primitive.name == "select_n"
             and tuple(e.outvars[0].aval.shape) in pool_shapes]
  assert not selects
  writes = [e for e in jaxpr_walk.eqns(jaxpr.jaxpr)
            if e.primitive.name == "dynamic_update_slice"
            and tuple(e.outvars[0].aval.shape) in pool_shapes]
  assert writes
