"""Likelihood-free temperature sampling over a black-box sampler: exact for any T in (0, 1], batch approximation for T = 1/n.

CALM's head can sample but not score, so P^(1/T) / Z is reached with samples only.
The sampler is `draw(rng, num) -> samples int32[num, B, K]`: num independent
draws for each of B independent sequences, one draw = K tokens; two draws are
the same outcome iff all K tokens agree.

Exact algorithm (paper, Algorithm 1), 1/T = n + alpha, n >= 1 integer, alpha in [0, 1):
  1. Draw n samples; if they all equal some x*, go on, else restart at 1.
     (Stopping at the first mismatch is the same event.) x* passes with
     probability P(x*)^n.
  2. If alpha > 0, accept x* with probability P(x*)^alpha, else restart at 1.
     This is a Bernoulli factory for f(p) = p^alpha from p-coins (a fresh
     draw equals x* with probability p). With q = 1 - p, the binomial series
         p^alpha = (1 - q)^alpha = 1 - sum_{k>=1} c_k q^k,
         c_k = (alpha / k) prod_{i<k} (1 - alpha / i) >= 0,  sum_k c_k = 1,
     is realised by: for i = 1, 2, ...: draw x; if x = x* accept; else with
     probability alpha / i reject; else continue. Rejection happens after k
     misses (probability q^k) followed by the reject coin, i.e. with
     probability sum_k q^k (alpha/k) prod_{i<k}(1 - alpha/i) = 1 - p^alpha.
  Output probability is proportional to P(x)^n P(x)^alpha = P(x)^(1/T). Every
  decision depends only on a prefix of an i.i.d. stream, so drawing in blocks
  of `draws_per_step` and ignoring the unused rest is exact. The expected cost
  grows fast as T -> 0 (all n must agree) and for high-entropy P, hence a cap.

Batch approximation (T = 1/n): draw one pool of S samples, count each distinct
outcome c_x, pick among outcomes with c_x >= m with weight C(c_x, m), where
m = min(n, max_x c_x) (i.e. fall back to n-1, n-2, ..., 1 when no outcome
reaches n). C(c_x, n) / C(S, n) is an unbiased estimate of P(x)^n, so the rule
converges to P^n / Z as S grows; at finite S the normalisation by the random
sum makes it biased, about 1/S: rare outcomes are over-represented (the
fallback to m < n flattens towards P). Measured total-variation distance to
P^n / Z on a 6-outcome P = (.4 .25 .15 .1 .06 .04) (tests/test_temperature.py):
T = 1/2: S = 16: 0.035, 64: 0.011, 256: 0.0024, 1024: 0.0007;
T = 1/3: S = 16: 0.093, 64: 0.030, 256: 0.0084, 1024: 0.0021.
Flatter P is worse: Zipf P over 64 / 1024 outcomes at S = 200 gives TV 0.010 / 0.016
(T = 1/2) and 0.021 / 0.033 (T = 1/3).

Everything is traceable and batched (jax.lax.while_loop, no Python loop over
the batch, no host round trip); call it inside jax.jit with `draw` closed over
the model's params.
"""
import math

import jax
import jax.numpy as jnp


def split_inverse_temperature(temperature):
  """1/T = n + alpha with integer n >= 1 and alpha in [0, 1) (1/T within 1e-9 of an integer counts as one)."""
  if not 0.0 < temperature <= 1.0:
    raise ValueError(f"temperature must be in (0, 1], got {temperature}; "
                     "likelihood-free sampling cannot raise the temperature above 1.")
  inverse = 1.0 / temperature
  nearest = round(inverse)
  if math.isclose(inverse, nearest, rel_tol=1e-9, abs_tol=0.0):
    return int(nearest), 0.0
  n = int(math.floor(inverse))
  return n, inverse - n


def _draw_shape(draw, rng, num):
  """(num, B, K) of draw(rng, num), without running it."""
  shape = jax.eval_shape(lambda key: draw(key, num), rng).shape
  if len(shape) != 3 or shape[0] != num:
    raise ValueError(f"draw(rng, {num}) must return int[{num}, B, K], got shape {shape}.")
  return shape


def pool_select(rng, samples_SxBxK, n):
  """The batch-approximation choice from a pool: tokens_BxK and the level m_B actually used.

  Args:
    rng: PRNG key.
    samples_SxBxK: int[S, B, K], S i.i.d. draws per sequence.
    n: int >= 1 (Python int or int32 array), target power, T = 1/n.
  Returns:
    tokens_BxK: one outcome per sequence, chosen with weight C(count, m) among the distinct
      outcomes whose count in the pool is >= m, m_B = min(n, max count) (cascade n, n-1, ..., 1).
    level_B: int32[B], that m (< n means the pool had no outcome repeated n times).
  Costs O(S^2 K B) (pairwise equality); fine for S up to a few hundred.
  """
  samples_BxSxK = jnp.swapaxes(samples_SxBxK, 0, 1)
  num = samples_BxSxK.shape[1]
  same_BxSxS = jnp.all(samples_BxSxK[:, :, None, :] == samples_BxSxK[:, None, :, :], axis=-1)
  count_BxS = jnp.sum(same_BxSxS, axis=-1).astype(jnp.int32)
  earlier_SxS = jnp.tril(jnp.ones((num, num), bool), k=-1)    # [i, j]: j < i
  first_BxS = ~jnp.any(same_BxSxS & earlier_SxS, axis=-1)     # first occurrence of its outcome
  level_B = jnp.minimum(jnp.asarray(n, jnp.int32), jnp.max(count_BxS, axis=-1))
  c_BxS = count_BxS.astype(jnp.float32)
  m_Bx1 = level_B[:, None].astype(jnp.float32)
  log_comb_BxS = (jax.lax.lgamma(c_BxS + 1.0) - jax.lax.lgamma(m_Bx1 + 1.0)
                  - jax.lax.lgamma(jnp.maximum(c_BxS - m_Bx1, 0.0) + 1.0))
  eligible_BxS = first_BxS & (count_BxS >= level_B[:, None])
  logits_BxS = jnp.where(eligible_BxS, log_comb_BxS, -jnp.inf)
  index_B = jax.random.categorical(rng, logits_BxS, axis=-1)
  tokens_BxK = jnp.take_along_axis(samples_BxSxK, index_B[:, None, None], axis=1)[:, 0]
  return tokens_BxK, level_B


def sample_batch_approx(draw, rng, temperature, num_samples):
  """Batch-approximate temperature sampling for T = 1/n: (tokens_BxK, stats).

  One pool of `num_samples` draws per sequence, then `pool_select`. T = 1 is one plain draw.
  stats: {'level': int32[B] the C(count, m) level used, 'num_fallbacks': int32 count of
  sequences with level < n, 'num_draws': int32[B]}.
  """
  n, alpha = split_inverse_temperature(temperature)
  if alpha != 0.0:
    raise ValueError(f"the batch approximation needs T = 1/n, got T={temperature} (1/T = {1 / temperature}); "
                     "use sample_exact for other temperatures.")
  if n == 1:
    return _one_draw(draw, rng)
  rng_draw, rng_pick = jax.random.split(rng)
  _draw_shape(draw, rng_draw, num_samples)
  samples_SxBxK = draw(rng_draw, num_samples)
  tokens_BxK, level_B = pool_select(rng_pick, samples_SxBxK, n)
  batch = samples_SxBxK.shape[1]
  stats = {"level": level_B, "num_fallbacks": jnp.sum(level_B < n).astype(jnp.int32),
           "num_draws": jnp.full((batch,), num_samples, jnp.int32)}
  return tokens_BxK, stats


def _one_draw(draw, rng):
  """T = 1: exactly one draw per sequence."""
  tokens_BxK = draw(rng, 1)[0]
  batch = tokens_BxK.shape[0]
  stats = {"level": jnp.ones((batch,), jnp.int32), "num_fallbacks": jnp.zeros((), jnp.int32),
           "num_draws": jnp.ones((batch,), jnp.int32)}
  return tokens_BxK, stats


def _consume(state, sample_BxK, u_B, n, alpha):
  """Feeds one draw to every sequence's state machine (see the module docstring).

  state: xstar_BxK (candidate), count_B (0..n agreeing draws so far; n = in the Bernoulli
  factory), step_B (factory iteration i), done_B, num_draws_B. n and alpha may be traced.
  """
  xstar_BxK, count_B, step_B, done_B, num_draws_B = state
  active_B = ~done_B
  equal_B = jnp.all(sample_BxK == xstar_BxK, axis=-1)
  start_B = active_B & (count_B == 0)
  collecting_B = active_B & (count_B > 0) & (count_B < n)
  extend_B = collecting_B & equal_B
  in_factory_B = active_B & (count_B == n)      # before this draw
  xstar_BxK = jnp.where(start_B[:, None], sample_BxK, xstar_BxK)
  count_B = jnp.where(start_B | extend_B, count_B + 1, count_B)
  reached_B = (start_B | extend_B) & (count_B == n)
  coin_B = u_B < alpha / step_B.astype(jnp.float32)
  accept_B = in_factory_B & equal_B
  reject_B = in_factory_B & ~equal_B & coin_B
  restart_B = (collecting_B & ~equal_B) | reject_B
  step_B = jnp.where(reached_B, 1, jnp.where(in_factory_B & ~equal_B & ~coin_B, step_B + 1, step_B))
  done_now_B = accept_B | (reached_B & (alpha == 0.0))   # alpha = 0: no factory
  count_B = jnp.where(restart_B, 0, count_B)
  num_draws_B = num_draws_B + active_B.astype(jnp.int32)
  return xstar_BxK, count_B, step_B, done_B | done_now_B, num_draws_B


def sample_exact(draw, rng, temperature, *, max_draws, draws_per_step, fallback_pool):
  """Exact temperature sampling, output ~ P^(1/T) / Z, for any T in (0, 1]: (tokens_BxK, stats).

  Args:
    draw: draw(rng, num) -> int32[num, B, K], the black-box sampler (traceable).
    rng: PRNG key.
    temperature: Python float in (0, 1]. T = 1 is exactly one draw.
    max_draws: cap on draws per sequence, rounded up to a multiple of draws_per_step. A sequence
      that has not finished by then falls back to `pool_select` (level round(1/T), at least 1)
      on its first `fallback_pool` draws; such outputs are approximate.
    draws_per_step: draws requested from `draw` per while-loop iteration (>= 1). Larger values
      amortise the call overhead; draws beyond a sequence's stopping point are discarded.
    fallback_pool: number of draws kept for the fallback (1 <= fallback_pool <= max_draws),
      rounded up to a multiple of draws_per_step.
  Returns:
    tokens_BxK, and stats {'num_draws': int32[B] draws consumed per sequence, 'fallback': bool[B],
    'num_fallbacks': int32 scalar}.
  """
  n, alpha = split_inverse_temperature(temperature)
  if n == 1 and alpha == 0.0:
    tokens_BxK, stats = _one_draw(draw, rng)
    return tokens_BxK, {"num_draws": stats["num_draws"], "fallback": jnp.zeros_like(stats["level"], bool),
                        "num_fallbacks": stats["num_fallbacks"]}
  return sample_exact_power(draw, rng, n, alpha, max_draws=max_draws, draws_per_step=draws_per_step,
                            fallback_pool=fallback_pool)


def sample_exact_power(draw, rng, n, alpha, *, max_draws, draws_per_step, fallback_pool):
  """`sample_exact` with 1/T = n + alpha given as (possibly traced) scalars: one compiled program for every T.

  n: int >= 1, alpha: float in [0, 1) (use `split_inverse_temperature`); the other arguments and the
  return value are those of `sample_exact`. T = 1 (n = 1, alpha = 0) costs one loop step here.
  """
  if draws_per_step < 1 or not 1 <= fallback_pool <= max_draws:
    raise ValueError(f"sample_exact needs draws_per_step >= 1 and 1 <= fallback_pool <= max_draws, got "
                     f"draws_per_step={draws_per_step}, fallback_pool={fallback_pool}, max_draws={max_draws}.")
  n = jnp.asarray(n, jnp.int32)
  alpha = jnp.asarray(alpha, jnp.float32)
  num_steps = -(-max_draws // draws_per_step)
  pool_size = -(-fallback_pool // draws_per_step) * draws_per_step
  _, batch, k = _draw_shape(draw, rng, draws_per_step)
  rng_loop, rng_fallback = jax.random.split(rng)

  def cond(carry):
    step, _, state, _ = carry
    return (step < num_steps) & ~jnp.all(state[3])

  def body(carry):
    step, key, state, pool_PxBxK = carry
    key, key_draw, key_coin = jax.random.split(key, 3)
    samples_SxBxK = draw(key_draw, draws_per_step).astype(jnp.int32)
    u_SxB = jax.random.uniform(key_coin, (draws_per_step, batch))
    state, _ = jax.lax.scan(
        lambda s, xu: (_consume(s, xu[0], xu[1], n, alpha), None), state, (samples_SxBxK, u_SxB))
    # In place: once the pool is full, later draws land in its last, scratch tile.
    offset = jnp.minimum(step * draws_per_step, pool_size)
    pool_PxBxK = jax.lax.dynamic_update_slice(pool_PxBxK, samples_SxBxK, (offset, 0, 0))
    return step + 1, key, state, pool_PxBxK

  state = (jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch,), jnp.int32),
           jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
  pool_PxBxK = jnp.zeros((pool_size + draws_per_step, batch, k), jnp.int32)
  _, _, state, pool_PxBxK = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), rng_loop, state, pool_PxBxK))
  pool_PxBxK = pool_PxBxK[:pool_size]
  xstar_BxK, _, _, done_B, num_draws_B = state
  fallback_B = ~done_B
  fallback_n = jnp.where(alpha < 0.5, n, n + 1)    # round(1/T)
  tokens_BxK = jax.lax.cond(
      jnp.any(fallback_B),
      lambda: jnp.where(fallback_B[:, None], pool_select(rng_fallback, pool_PxBxK, fallback_n)[0], xstar_BxK),
      lambda: xstar_BxK)
  return tokens_BxK, {"num_draws": num_draws_B, "fallback": fallback_B,
                      "num_fallbacks": jnp.sum(fallback_B).astype(jnp.int32)}
