"""The energy-score loss of CALM: an exact, memory-lean estimator with a norm that is safe at 0.

For one position with N model samples x_i and M target samples y_j (beta in (0, 2)):

  loss = 2/(N M) sum_ij ||x_i - y_j||^beta - 1/(N (N-1)) sum_{i != j} ||x_i - x_j||^beta
       = 2 * fidelity - diversity,

the negative energy score, a strictly proper scoring rule: its expectation is
minimised exactly when the x_i follow the target distribution.

Two traps, both handled here:
  * JAX differentiates ||v|| = sqrt(sum v^2) at v = 0 as 0 * inf = NaN. With a
    zero-initialised head all N samples coincide at step 0, so every x_i - x_j
    is 0. `safe_norm_pow` returns 0 with a zero gradient below a tiny threshold
    and the exact value (exact gradient) everywhere else.
  * The i == j terms are left out of the diversity sum (they are 0 in value
    but carry the same NaN gradient): they are never formed.

Memory: the direct difference tensor [N, M, B, l] (8 x 100 x positions x 128)
is gigabytes per device at the paper's sizes. The fidelity term therefore uses
||a||^2 + ||b||^2 - 2 a.b on [B, N, M] only, after centring both sets on the
mean of the y_j (distances are translation invariant; centring removes the
cancellation error that a large common offset would cause) and with the
contraction at HIGHEST precision (TPUs would otherwise multiply f32 in one
bf16 pass), clamped at 0. The diversity term, whose distances start at exactly
0 and must be accurate there, uses direct differences, N - 1 shifted copies of
[N, B, l] that XLA fuses into their reductions. Everything is computed in float32.
Peak temporary memory is then O(M B l), the size of the y samples themselves.
"""
import jax
import jax.numpy as jnp

# Below this squared distance a norm counts as 0 (value 0, gradient 0). It bounds
# the gradient of ||v||^beta for beta < 1, where it grows like ||v||^(beta-1).
_TINY_SQ = 1e-30


def safe_norm_pow(sq_dist, beta):
  """||v||^beta from the squared norm sq_dist = ||v||^2, with finite gradients at 0."""
  positive = sq_dist > _TINY_SQ
  safe = jnp.where(positive, sq_dist, 1.0)
  return jnp.where(positive, safe ** (0.5 * beta), 0.0)


def _cross_distance_pow(x_NxBxl, y_MxBxl, beta):
  """||x_i - y_j||^beta for all pairs, as [B, N, M], without an [N, M, B, l] tensor."""
  center_Bxl = jax.lax.stop_gradient(jnp.mean(y_MxBxl, axis=0))
  # Positions first, so that the contraction is a batched matmul without a relayout.
  x_BxNxl = jnp.swapaxes(x_NxBxl - center_Bxl, 0, 1)
  y_BxMxl = jnp.swapaxes(y_MxBxl - center_Bxl, 0, 1)
  x_sq_BxN = jnp.sum(jnp.square(x_BxNxl), axis=-1)
  y_sq_BxM = jnp.sum(jnp.square(y_BxMxl), axis=-1)
  xy_BxNxM = jnp.einsum("bnl,bml->bnm", x_BxNxl, y_BxMxl,
                        precision=jax.lax.Precision.HIGHEST)
  sq_BxNxM = x_sq_BxN[:, :, None] + y_sq_BxM[:, None, :] - 2.0 * xy_BxNxM
  return safe_norm_pow(jnp.maximum(sq_BxNxM, 0.0), beta)


def _diversity(x_NxBxl, beta):
  """mean_{i != j} ||x_i - x_j||^beta per position, [B], from direct differences.

  Shift s = 1..N-1 pairs every x_i with x_{(i+s) mod N}: together the shifts visit
  each ordered pair i != j once, and no i == j term is ever formed. Each shift is an
  [N, B, l] elementwise expression that XLA fuses into its reduction.
  """
  n = x_NxBxl.shape[0]
  total_B = 0.0
  for shift in range(1, n):
    diff_NxBxl = x_NxBxl - jnp.roll(x_NxBxl, shift, axis=0)
    total_B = total_B + jnp.sum(safe_norm_pow(jnp.sum(jnp.square(diff_NxBxl), axis=-1), beta),
                                axis=0)
  return total_B / (n * (n - 1))


def energy_terms(x_NxBxl, y_MxBxl, beta):
  """The two terms of the energy score per position: (fidelity_B, diversity_B).

  fidelity_B = mean_{i,j} ||x_i - y_j||^beta, diversity_B = mean_{i != j} ||x_i - x_j||^beta.
  x: N >= 2 model samples, y: M >= 1 target samples, for B positions of l dims.
  """
  n, m = x_NxBxl.shape[0], y_MxBxl.shape[0]
  if n < 2:
    raise ValueError(
        f"energy_terms: the diversity term needs N >= 2 model samples, got N={n}; "
        "raise config.model.num_model_samples.")
  if m < 1:
    raise ValueError("energy_terms: need M >= 1 target samples (config.model.num_target_samples).")
  x_NxBxl = jnp.asarray(x_NxBxl, jnp.float32)
  y_MxBxl = jnp.asarray(y_MxBxl, jnp.float32)
  fidelity_B = jnp.mean(_cross_distance_pow(x_NxBxl, y_MxBxl, beta), axis=(1, 2))
  diversity_B = _diversity(x_NxBxl, beta)
  return fidelity_B, diversity_B

