"""Tests of Brier-n / BrierLM estimators against exact enumeration on tiny vocabularies."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.eval import brier

pytestmark = pytest.mark.unit

VOCAB = 3
N_MAX = 4
SEEDS = 40000   # independent repetitions of the estimator, vectorised


def _ngram_model(seed):
  """An autoregressive model over VOCAB tokens: cond[j] is float64[VOCAB^j, VOCAB], p(x_j | x_<j)."""
  rng = np.random.default_rng(seed)
  return [rng.dirichlet(np.full(VOCAB, 0.6), size=VOCAB ** j) for j in range(N_MAX)]


def _prefix_index(x_xN, j):
  """Row of cond[j] for the prefix x[..., :j] (base-VOCAB number)."""
  index = np.zeros(x_xN.shape[:-1], np.int64)
  for i in range(j):
    index = index * VOCAB + x_xN[..., i]
  return index


def _joint(cond, seq):
  return float(np.prod([cond[j][_prefix_index(np.array(seq), j), seq[j]] for j in range(len(seq))]))


def _exact_brier(cond, target):
  """2 P(y[:n]) - sum_{s in V^n} P(s)^2 for n = 1..N_MAX, by enumeration."""
  out = []
  for n in range(1, N_MAX + 1):
    sum_sq = sum(_joint(cond, s) ** 2 for s in itertools.product(range(VOCAB), repeat=n))
    out.append(2 * _joint(cond, target[:n]) - sum_sq)
  return np.array(out)


def _sample(cond, rng, shape):
  """int64[*shape, N_MAX] sequences from the model (inverse CDF, token by token)."""
  x = np.zeros(shape + (N_MAX,), np.int64)
  for j in range(N_MAX):
    probs = cond[j][_prefix_index(x, j)]
    u = rng.random(shape)[..., None]
    x[..., j] = np.sum(u >= np.cumsum(probs, axis=-1)[..., :-1], axis=-1)
  return x


def test_categorical_matches_exact():
  """n = 1 on a 5-token categorical: the mean of 1{x1=y}+1{x2=y}-1{x1=x2} is 2p(y) - sum p^2 for every y."""
  p = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
  rng = np.random.default_rng(1)
  x1, x2 = (rng.choice(len(p), size=(SEEDS, len(p)), p=p)[..., None] for _ in range(2))
  y = np.broadcast_to(np.arange(len(p))[None, :, None], x1.shape)
  est = np.asarray(brier.brier_estimates(jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(y)))[..., 0]
  want = 2 * p - np.sum(p ** 2)
  se = est.std(0) / np.sqrt(SEEDS)
  np.testing.assert_array_less(np.abs(est.mean(0) - want), 5 * se + 1e-6)


@pytest.mark.parametrize("target", [(0, 0, 0, 0), (2, 1, 0, 1), None])
def test_ngram_estimators_match_exact(target):
  """Brier-1..4 of a known 4-gram model: both estimators unbiased; the AR one has lower variance."""
  cond = _ngram_model(seed=7)
  rng = np.random.default_rng(3)
  if target is None:   # the model's most likely path
    target = [0] * N_MAX
    for j in range(N_MAX):
      target[j] = int(np.argmax(cond[j][_prefix_index(np.array(target), j)]))
  want_N = _exact_brier(cond, target)

  x1_MxN, x2_MxN = _sample(cond, rng, (SEEDS,)), _sample(cond, rng, (SEEDS,))
  y_MxN = np.broadcast_to(np.array(target), x1_MxN.shape)
  valid_MxN = np.ones_like(x1_MxN, bool)

  sums_N, counts_N = brier.brier_terms(jnp.asarray(x1_MxN), jnp.asarray(x2_MxN), jnp.asarray(y_MxN),
                                       jnp.asarray(valid_MxN))
  np.testing.assert_array_equal(counts_N, SEEDS)
  two_sample_MxN = np.asarray(brier.brier_estimates(jnp.asarray(x1_MxN), jnp.asarray(x2_MxN),
                                                    jnp.asarray(y_MxN)), np.float64)
  np.testing.assert_allclose(np.asarray(sums_N) / SEEDS, two_sample_MxN.mean(0), rtol=1e-5, atol=1e-6)

  target_logprob_N = np.log([cond[j][_prefix_index(np.array(target), j), target[j]] for j in range(N_MAX)])
  target_logprob_MxN = np.broadcast_to(target_logprob_N, x1_MxN.shape)
  collision_MxN = np.stack([np.sum(cond[j][_prefix_index(x1_MxN, j)] ** 2, axis=-1)
                            for j in range(N_MAX)], axis=-1)
  args = [jnp.asarray(a) for a in (target_logprob_MxN, x1_MxN, x2_MxN, collision_MxN)]
  ar_MxN = np.asarray(brier.ar_brier_estimates(*args), np.float64)
  ar_sums_N, ar_counts_N = brier.ar_brier_terms(*args, jnp.asarray(valid_MxN))
  np.testing.assert_array_equal(ar_counts_N, SEEDS)
  np.testing.assert_allclose(np.asarray(ar_sums_N) / SEEDS, ar_MxN.mean(0), rtol=1e-4, atol=1e-6)

  for name, est_MxN in [("two-sample", two_sample_MxN), ("ar", ar_MxN)]:
    se_N = est_MxN.std(0) / np.sqrt(SEEDS)
    err_N = np.abs(est_MxN.mean(0) - want_N)
    assert (err_N < 5 * se_N + 1e-5).all(), (name, est_MxN.mean(0), want_N, se_N)
  assert ar_MxN[:, 0].std() < 1e-5                        # n = 1: exact, no sampling left
  assert (ar_MxN.var(0) < two_sample_MxN.var(0)).all()


def test_sum_sq_probs():
  logits = np.random.default_rng(0).normal(size=(3, 7)) * 4
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(brier.sum_sq_probs(jnp.asarray(logits)), (p ** 2).sum(-1), rtol=1e-5)


def test_softmax_stats():
  logits = np.random.default_rng(1).normal(size=(3, 7)) * 4 + 50.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  lse, sum_sq = brier.softmax_stats(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(lse, np.log(np.exp(logits - 50.0).sum(-1)) + 50.0, rtol=1e-6)
  np.testing.assert_allclose(sum_sq, (p ** 2).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("v", [11, 12])      # 11: tiles of 4, the last one padded; 12: no padding
def test_two_stage_categorical_is_softmax_distributed(v):
  import jax
  logits = np.random.default_rng(v).normal(size=v) * 1.5
  p = np.exp(logits - logits.max())
  p /= p.sum()
  draws = 40000
  x = brier.sample_categorical(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (draws, v)))
  freq = np.bincount(np.asarray(x), minlength=v) / draws
  assert x.dtype == jnp.int32 and freq.shape == (v,)
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / draws).max())


def test_ngram_windows_and_valid():
  x_BxL = jnp.array([[10, 11, 12, 13, 14, 15]])
  np.testing.assert_array_equal(brier.ngram_windows(x_BxL, 3)[0, 4], [14, 15, 0])
  np.testing.assert_array_equal(brier.ngram_windows(x_BxL, 3)[0, 1], [11, 12, 13])
  # Padding at the tail, and a hole at index 1.
  mask_BxL = jnp.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]])
  valid_BxLxN = np.asarray(brier.ngram_valid(mask_BxL, 4))
  for b in range(2):
    for t in range(6):
      for n in range(1, 5):
        want = t + n <= 6 and bool(np.all(np.asarray(mask_BxL)[b, t:t + n]))
        assert valid_BxLxN[b, t, n - 1] == want, (b, t, n)


def test_invalid_positions_are_excluded():
  rng = np.random.default_rng(5)
  x1, x2, y = (rng.integers(0, 2, size=(4, 9, N_MAX)) for _ in range(3))
  mask_BxL = (rng.random((4, 9)) > 0.3).astype(np.int32)
  valid = np.asarray(brier.ngram_valid(jnp.asarray(mask_BxL), N_MAX))
  sums_N, counts_N = brier.brier_terms(jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(y), jnp.asarray(valid))
  est = np.asarray(brier.brier_estimates(jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(y)))
  for n in range(N_MAX):
    np.testing.assert_allclose(sums_N[n], est[..., n][valid[..., n]].sum(), atol=1e-5)
    assert counts_N[n] == valid[..., n].sum()
  # Garbage in invalid positions changes nothing.
  x1_bad = np.where(valid, x1, 99)
  sums_bad_N, _ = brier.brier_terms(jnp.asarray(x1_bad), jnp.asarray(x2), jnp.asarray(y), jnp.asarray(valid))
  np.testing.assert_allclose(sums_bad_N, sums_N)


def test_brierlm_clamps_and_accumulates():
  assert brier.brierlm([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)
  assert brier.brierlm([0.8, 0.4, 0.2, 0.1]) == pytest.approx(100 * (0.8 * 0.4 * 0.2 * 0.1) ** 0.25)
  assert brier.brierlm([0.5, 0.4, -0.1, -0.2]) == 0.0   # two negatives must not multiply to a positive
  assert brier.brierlm([0.5, 0.4, 0.0, 0.3]) == 0.0
  with pytest.raises(ValueError, match="Brier-1..4"):
    brier.brierlm([0.5, 0.4])
  acc = brier.BrierAccumulator()
  acc.add(jnp.array([3.0, 2.0, 1.0, 0.5]), jnp.array([4, 4, 4, 2]))
  acc.add(np.array([1.0, 0.0, 1.0, 0.5]), np.array([4, 4, 4, 2]))
  result = acc.result()
  np.testing.assert_allclose([result[f"brier{n}"] for n in range(1, 5)], [0.5, 0.25, 0.25, 0.25])
  assert result["brierlm"] == pytest.approx(brier.brierlm([0.5, 0.25, 0.25, 0.25]))
  empty = brier.BrierAccumulator().result()
  assert np.isnan(empty["brier1"]) and np.isnan(empty["brierlm"])


def test_multi_sample_estimator_is_unbiased_and_lower_variance():
  """S = 8 samples per position: the pairwise U-statistic matches exact enumeration, equals the
  two-sample estimator at S = 2, and has a smaller variance for every n."""
  cond = _ngram_model(seed=11)
  rng = np.random.default_rng(5)
  target = [1, 0, 2, 1]
  want_N = _exact_brier(cond, target)
  samples_SxMxN = np.stack([_sample(cond, rng, (SEEDS // 4,)) for _ in range(8)])
  y_MxN = np.broadcast_to(np.array(target), samples_SxMxN.shape[1:])
  multi_MxN = np.asarray(brier.multi_sample_estimates(jnp.asarray(samples_SxMxN), jnp.asarray(y_MxN)),
                         np.float64)
  se_N = multi_MxN.std(0) / np.sqrt(multi_MxN.shape[0])
  assert (np.abs(multi_MxN.mean(0) - want_N) < 5 * se_N + 1e-5).all(), (multi_MxN.mean(0), want_N)
  two_MxN = np.asarray(brier.brier_estimates(*(jnp.asarray(a) for a in
                                               (samples_SxMxN[0], samples_SxMxN[1], y_MxN))))
  np.testing.assert_allclose(
      np.asarray(brier.multi_sample_estimates(jnp.asarray(samples_SxMxN[:2]), jnp.asarray(y_MxN))),
      two_MxN, atol=1e-6)
  assert (multi_MxN.std(0) < 0.7 * two_MxN.std(0)).all(), (multi_MxN.std(0), two_MxN.std(0))
  with pytest.raises(ValueError, match="brier_samples"):
    brier.multi_sample_estimates(jnp.asarray(samples_SxMxN[:1]), jnp.asarray(y_MxN))
