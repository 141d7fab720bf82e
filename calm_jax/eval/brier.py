"""Brier-n and BrierLM: likelihood-free estimators, the AR baseline's lower-variance estimator, aggregation.

Brier-n of a model at one position with true continuation y (n tokens) is

  Brier-n = 2 P(y) - sum_x P(x)^2        (x ranges over all n-token strings),

higher is better (1 for a model sure of the right answer). Two estimators:

  * Likelihood-free (CALM, or any sampler): with two independent model samples
    x1, x2 of the next n tokens,
        1{x1 = y} + 1{x2 = y} - 1{x1 = x2}
    is unbiased: E 1{x1 = y} = P(y) and E 1{x1 = x2} = sum_x P(x)^2.
    "=" compares the whole n-token prefix, so one pair of 4-token samples gives
    Brier-1..4 at once (`brier_estimates`).
  * The AR baseline's lower-variance estimator (paper; `ar_brier_estimates`):
    accuracy term 2 P(y) computed exactly as the teacher-forced product
    prod_j p(y_j | y_<j); collision term 1{x1[:n-1] = x2[:n-1]} *
    sum_v p(v | x1[:n-1])^2, i.e. Monte-Carlo on the (n-1)-token prefix and exact
    on the last token. Its expectation is sum_{s} P(s)^2 over prefixes s of
    length n-1, times the exact last-token collision, = sum_x P(x)^2.

BrierLM = 100 * geometric mean of Brier-1..4, every Brier-n clamped at 0 first
(so any non-positive term gives 0).

Positions are any leading shape `...` (e.g. B x L or B x T); the last axis N
(N <= 4 in practice) indexes n = 1..N. `valid_...xN[..., n-1]` says the
position has a full n-token target (built with `ngram_valid`); invalid entries
are excluded from sums and counts, never padded into the average. Sums and
counts come back separately so callers can aggregate across batches and hosts
(`BrierAccumulator`).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_N = 4   # BrierLM uses Brier-1..4.
_SUM_BLOCK = 256   # positions per partial sum in masked_sums


def ngram_windows(x_BxL, n_max, fill=0):
  """x_BxLxN with x_BxLxN[b, t, j] = x_BxL[b, t + j] (fill beyond the end of the sequence)."""
  length = x_BxL.shape[-1]
  pad = jnp.full(x_BxL.shape[:-1] + (n_max - 1,), fill, x_BxL.dtype)
  padded = jnp.concatenate([x_BxL, pad], axis=-1)
  return jnp.stack([padded[..., j:j + length] for j in range(n_max)], axis=-1)


def ngram_valid(mask_BxL, n_max):
  """valid_BxLxN[b, t, n-1]: tokens t .. t+n-1 all exist (t+n <= L) and all have mask 1.

  Use it on the target mask aligned with the targets (for an AR model, the mask of
  tokens[:, 1:]); position t then has a full n-token target iff valid[b, t, n-1].
  """
  ok_BxLxN = ngram_windows(mask_BxL.astype(jnp.int32), n_max, fill=0) > 0
  return jnp.cumprod(ok_BxLxN.astype(jnp.int32), axis=-1) > 0


def _prefix_equal(a_xN, b_xN):
  """eq_xN[..., n-1] = 1{a[:n] = b[:n]} (whole-prefix equality), as float32."""
  return jnp.cumprod((a_xN == b_xN).astype(jnp.float32), axis=-1)


@jax.jit
def brier_estimates(sample1_xN, sample2_xN, target_xN):
  """Per-position likelihood-free Brier-n estimates, n = 1..N, float32[..., N].

  Args:
    sample1_xN, sample2_xN: int[..., N], two independent model samples of the next N tokens.
    target_xN: int[..., N], the true next N tokens.
  Returns:
    est_xN with est[..., n-1] = 1{x1[:n]=y[:n]} + 1{x2[:n]=y[:n]} - 1{x1[:n]=x2[:n]}.
  """
  return (_prefix_equal(sample1_xN, target_xN) + _prefix_equal(sample2_xN, target_xN)
          - _prefix_equal(sample1_xN, sample2_xN))


def multi_sample_estimates(samples_SxN, target_xN):
  """Per-position Brier-n estimates from S >= 2 independent samples: float32[..., N].

  The U-statistic of the two-sample estimator over all sample pairs:
    (2/S) sum_i 1{x_i[:n] = y[:n]}  -  (2 / (S (S-1))) sum_{i<j} 1{x_i[:n] = x_j[:n]},
  unbiased for 2 P(y) - sum_x P(x)^2 like `brier_estimates` (which it equals at S = 2),
  with a variance that falls with S: more samples per position resolve small Brier-3/4.
  samples_SxN: int[S, ..., N]; target_xN: int[..., N].
  """
  s = samples_SxN.shape[0]
  if s < 2:
    raise ValueError(f"multi_sample_estimates needs S >= 2 samples per position, got {s}; "
                     "raise config.eval.brier_samples.")
  accuracy_xN = sum(_prefix_equal(samples_SxN[i], target_xN) for i in range(s)) * (2.0 / s)
  pairs = [(i, j) for i in range(s) for j in range(i + 1, s)]
  collision_xN = sum(_prefix_equal(samples_SxN[i], samples_SxN[j]) for i, j in pairs)
  return accuracy_xN - collision_xN / len(pairs)


def softmax_stats(logits_xV):
  """(logsumexp, sum_v softmax_v^2) over the last axis, float32, from three reductions of the
  logits (no [..., V] temporary: log_softmax or 2 * logits would each be one)."""
  logits_xV = logits_xV.astype(jnp.float32)
  max_x = jax.lax.stop_gradient(jnp.max(logits_xV, axis=-1))
  e_xV = jnp.exp(logits_xV - max_x[..., None])
  # One variadic reduction of (e, e^2): XLA fuses e into it instead of storing it.
  sum1_x, sum2_x = jax.lax.reduce((e_xV, e_xV * e_xV), (0.0, 0.0),
                                  lambda a, b: (a[0] + b[0], a[1] + b[1]), (e_xV.ndim - 1,))
  return max_x + jnp.log(sum1_x), sum2_x / jnp.square(sum1_x)


def sum_sq_probs(logits_xV):
  """sum_v softmax(logits)_v^2 over the last axis, float32 (the exact one-token collision probability)."""
  return softmax_stats(logits_xV)[1]


def _token_tile(v):
  """About sqrt(V) tokens: a divisor of V in [sqrt(V), 2 sqrt(V)] if there is one (no padding)."""
  root = max(1, math.isqrt(v - 1) + 1) if v > 1 else 1
  return next((t for t in range(root, 2 * root + 1) if v % t == 0), root)


def sample_categorical(key, logits_xV):
  """One draw from softmax(logits) over the last axis, int32[...], in two stages.

  A tile of about sqrt(V) tokens is drawn by its total probability, then a token within
  it: exactly softmax-distributed, with Gumbel noise of [..., V / tile] and [..., tile]
  instead of jax.random.categorical's [..., V] (at V = 128k and 16k positions that is
  2 G random numbers, and XLA keeps each draw's noise alive from the start of the program).
  """
  v = logits_xV.shape[-1]
  tile = _token_tile(v)
  tiles = -(-v // tile)
  logits_xV = logits_xV.astype(jnp.float32)
  if tiles * tile != v:
    pad = [(0, 0)] * (logits_xV.ndim - 1) + [(0, tiles * tile - v)]
    logits_xV = jnp.pad(logits_xV, pad, constant_values=-jnp.inf)
  logits_xTxt = logits_xV.reshape(logits_xV.shape[:-1] + (tiles, tile))
  key_tile, key_token = jax.random.split(key)
  tile_x = jax.random.categorical(key_tile, jax.nn.logsumexp(logits_xTxt, axis=-1), axis=-1)
  within_xt = jnp.take_along_axis(logits_xTxt, tile_x[..., None, None], axis=-2)[..., 0, :]
  token_x = jax.random.categorical(key_token, within_xt, axis=-1)
  return (tile_x * tile + token_x).astype(jnp.int32)


@jax.jit
def ar_brier_estimates(target_logprob_xN, sample1_xN, sample2_xN, collision_prob_xN):
  """Per-position lower-variance Brier-n estimates for a model with exact conditionals, float32[..., N].

  Args:
    target_logprob_xN: float[..., N], log p(y_j | context, y_<j) for the true tokens y_1..y_N
      (teacher forced; `ngram_windows` of the per-token target log-probs).
    sample1_xN, sample2_xN: int[..., N], two independent sampled continuations of the context
      (the last token of each is not used: only the (n-1)-prefixes matter).
    collision_prob_xN: float[..., N], sum_v p(v | context, x1[:j])^2 for j = 0..N-1, i.e. the exact
      collision probability of the next token along sample 1's path (`sum_sq_probs` of those logits).
  Returns:
    est_xN with est[..., n-1] = 2 prod_{j<n} p(y_j | y_<j) - 1{x1[:n-1]=x2[:n-1]} * collision_prob[..., n-1].
  """
  accuracy_xN = 2.0 * jnp.exp(jnp.cumsum(target_logprob_xN.astype(jnp.float32), axis=-1))
  agree_xN = _prefix_equal(sample1_xN, sample2_xN)
  ones = jnp.ones(agree_xN.shape[:-1] + (1,), jnp.float32)
  prefix_agree_xN = jnp.concatenate([ones, agree_xN[..., :-1]], axis=-1)
  return accuracy_xN - prefix_agree_xN * collision_prob_xN.astype(jnp.float32)


@jax.jit
def masked_sums(est_xN, valid_xN):
  """(sums_N float32, counts_N int32) of per-position estimates over valid entries only."""
  valid = valid_xN.astype(bool)
  n_max = est_xN.shape[-1]
  counts_N = jnp.sum(valid.reshape(-1, n_max).astype(jnp.int32), axis=0)
  # Two-level float32 sum (blocks of _SUM_BLOCK, then blocks): error ~(block + #blocks) eps, not #positions eps.
  values_PxN = jnp.where(valid, est_xN.astype(jnp.float32), 0.0).reshape(-1, n_max)
  pad = -values_PxN.shape[0] % _SUM_BLOCK
  values_PxN = jnp.pad(values_PxN, ((0, pad), (0, 0)))
  sums_N = jnp.sum(jnp.sum(values_PxN.reshape(-1, _SUM_BLOCK, n_max), axis=1), axis=0)
  return sums_N, counts_N


@jax.jit
def brier_terms(sample1_xN, sample2_xN, target_xN, valid_xN):
  """Likelihood-free Brier-1..N summed over valid positions: (sums_N, counts_N); mean = sums / counts."""
  return masked_sums(brier_estimates(sample1_xN, sample2_xN, target_xN), valid_xN)


@jax.jit
def multi_sample_terms(samples_SxN, target_xN, valid_xN):
  """Brier-1..N from S samples per position summed over valid positions: (sums_N, counts_N)."""
  return masked_sums(multi_sample_estimates(samples_SxN, target_xN), valid_xN)


@jax.jit
def ar_brier_terms(target_logprob_xN, sample1_xN, sample2_xN, collision_prob_xN, valid_xN):
  """Lower-variance (AR) Brier-1..N summed over valid positions: (sums_N, counts_N)."""
  est_xN = ar_brier_estimates(target_logprob_xN, sample1_xN, sample2_xN, collision_prob_xN)
  return masked_sums(est_xN, valid_xN)


def brierlm(briers):
  """100 * geometric mean of Brier-1..4 (a length-4 sequence); each clamped at 0 (any <= 0 gives 0)."""
  briers = np.asarray(briers, np.float64)
  if briers.shape != (MAX_N,):
    raise ValueError(f"brierlm needs exactly Brier-1..{MAX_N}, got shape {briers.shape}; "
                     f"evaluate with n_max={MAX_N}.")
  return float(100.0 * np.prod(np.maximum(briers, 0.0)) ** (1.0 / MAX_N))


class BrierAccumulator:
  """Host-side float64 running sums/counts of Brier-n across batches; `result()` gives the metrics dict."""

  def __init__(self, n_max=MAX_N):
    self.sums_N = np.zeros(n_max, np.float64)
    self.counts_N = np.zeros(n_max, np.int64)

  def add(self, sums_N, counts_N):
    """Adds one batch's (sums_N, counts_N) from `brier_terms` / `ar_brier_terms` (device or numpy)."""
    self.sums_N += np.asarray(sums_N, np.float64)
    self.counts_N += np.asarray(counts_N, np.int64)

  def result(self):
    """{'brier1'.. 'brierN': mean over valid positions (nan if none), 'brierlm' when N = 4}."""
    return result_from_sums(self.sums_N, self.counts_N)


def result_from_sums(sums_N, counts_N):
  """{'brier1'.. 'brierN': sums / counts (nan where a count is 0), 'brierlm' when N = 4}."""
  sums_N, counts_N = np.asarray(sums_N, np.float64), np.asarray(counts_N, np.float64)
  means_N = np.where(counts_N > 0, sums_N / np.maximum(counts_N, 1), np.nan)
  out = {f"brier{n + 1}": float(m) for n, m in enumerate(means_N)}
  if len(means_N) == MAX_N:
    out["brierlm"] = float("nan") if np.isnan(means_N).any() else brierlm(means_N)
  return out
