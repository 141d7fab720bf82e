"""The unigram baseline's Brier-n at a model's eval positions, against a direct computation."""
import numpy as np
import pytest

from calm_jax.eval import unigram

pytestmark = pytest.mark.unit


def _direct(p_V, tokens_BxL, mask_BxL, start, stride, n):
  """2 prod p(y) - (sum p^2)^n over positions start + stride*i whose n tokens exist and are real."""
  values = []
  for row, mask in zip(tokens_BxL, mask_BxL):
    for t in range(start, len(row), stride):
      if t + n <= len(row) and mask[t:t + n].all():
        values.append(2 * np.prod(p_V[row[t:t + n]]) - np.sum(p_V ** 2) ** n)
  return np.sum(values), len(values)


def test_brier_sums_match_a_direct_loop():
  rng = np.random.default_rng(0)
  p_V = rng.dirichlet(np.ones(7))
  tokens = rng.integers(0, 7, (3, 16))
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0                           # padding at the end of one row
  for start, stride in ((1, 1), (4, 4), (2, 2)):
    sums_N, counts_N = unigram.brier_sums(p_V, tokens, mask, start, stride)
    for n in range(1, 5):
      want_sum, want_count = _direct(p_V, tokens, mask, start, stride, n)
      assert counts_N[n - 1] == want_count
      np.testing.assert_allclose(sums_N[n - 1], want_sum, rtol=1e-12)


def test_brier1_expectation_is_sum_p_squared_under_the_model_itself():
  """Tokens drawn from p: E[2 p(y) - sum p^2] = sum p^2 (the estimator is exact, not sampled)."""
  rng = np.random.default_rng(1)
  p_V = rng.dirichlet(np.ones(20))
  tokens = rng.choice(20, size=(64, 512), p=p_V)
  sums_N, counts_N = unigram.brier_sums(p_V, tokens, np.ones_like(tokens), 1, 1)
  np.testing.assert_allclose(sums_N[0] / counts_N[0], np.sum(p_V ** 2), rtol=0.02)
