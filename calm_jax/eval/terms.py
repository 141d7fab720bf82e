"""Per-batch evaluation terms of each stage (pure, jittable): the model's metrics, Brier-n sums for CALM and AR.

Every function takes (model, params, batch, rng) with batch = {'tokens', 'mask'}:
int32[B, L] blocks of the eval stream, and returns sums and counts that the host
adds up across batches (eval/evaluator.py), so the mean is over valid positions only: a position is counted for Brier-n iff its next n tokens lie in
the block and all have mask 1 (brier.ngram_valid).

CALM (likelihood-free, as the reference's eval_brier). Position t of a block of
T = L/K chunks is the backbone state h[t] after true chunks 0..t; it predicts
chunk t+1. Two independent head samples per position, decoded by the frozen
autoencoder (argmax of the decoder logits), give sample chunks s1[t], s2[t].
  * K >= 4: x1 = s1[t][:4], x2 = s2[t][:4]; brier.brier_terms. With
    config.eval.brier_samples = S > 2 samples the estimate is the U-statistic over all
    pairs (brier.multi_sample_estimates): same expectation, lower variance.
  * K < 4, m = ceil(4/K) chunks cover 4 tokens.
    Accuracy: 1{x1[:n] = y[:n]} with x1 = s1[t], s1[t+1], ... (each a sample given
    the *true* prefix): a product of independent indicators, so its mean is
    prod_j P(y_j | y_<j) = P(y[:n]).
    Collision: the two samples are continued autoregressively for m-1 more chunks:
    the backbone is extended (KV cache) with sample 1's chunk and both samples
    draw their next chunk from that one state. Wherever the prefixes agree this is
    each sample's own path, and after they disagree the indicator is 0 anyway, so
    E 1{x1[:n] = x2[:n]} = sum_x P(x)^2 exactly.
    The extra steps of all positions run at once, without copying any cache: the
    teacher-forced pass fills a KV cache of the whole block, which every position then
    reads (keys 0..t for position t) while it appends its own chunks to a small
    per-position suffix cache (model.extend_branches): each extra step costs about
    one forward pass of the block, in time and memory.
AR baseline (the paper's lower-variance estimator, brier.ar_brier_terms): the
accuracy term is the exact teacher-forced product of probabilities; the
collision term multiplies 1{x1[:n-1] = x2[:n-1]} (sampled the same way, from the
state along sample 1's path) by the exact sum_v p(v | x1[:n-1])^2. Plus the
summed cross-entropy for perplexity. The AR continuations run like CALM's (shared prefix
cache, per-position suffix caches).
"""
import math

import jax
import jax.numpy as jnp

from calm_jax.eval import brier
from calm_jax.models.losses import map_chunks

N = brier.MAX_N


def model_metric_terms(model):
  """f(params, batch, rng) -> (the model's eval metrics, valid tokens): weighted means on the host.

  The trainer's periodic eval (every stage) and the autoencoder's calm-eval.
  """

  def terms(params, batch, rng):
    dropout, sample = jax.random.split(rng)
    _, metrics = model.apply({"params": params}, batch, train=False,
                             rngs={"dropout": dropout, "sample": sample})
    return metrics, batch["mask"].sum().astype(jnp.float32)

  return terms


def brier_sum_terms(fn):
  """calm_terms / ar_terms as f(params, batch, rng) -> ({brier_sums, brier_counts, loss_sum,
  loss_count}, 1): the evaluator's (sums, weight) form."""

  def terms(params, batch, rng):
    sums_N, counts_N, loss_sum, loss_count = fn(params, batch, rng)
    return (dict(brier_sums=sums_N, brier_counts=counts_N, loss_sum=loss_sum,
                 loss_count=loss_count), jnp.ones((), jnp.float32))

  return terms


def _sample_chunks(model, variables, h_xD, rng, num=2):
  """num independent head samples per state, decoded by argmax: int32[num, ..., K]."""

  return jnp.stack([model.apply(variables, h_xD, method=model.sample_chunk, rngs={"sample": key})
                    for key in jax.random.split(rng, num)])


def _targets_and_valid(tokens_BxL, mask_BxL, start, count, stride):
  """n-token target windows and their validity at token offsets start + stride * i, i < count."""
  index = start + stride * jnp.arange(count)
  y_BxPxN = brier.ngram_windows(tokens_BxL, N)[:, index]
  valid_BxPxN = brier.ngram_valid(mask_BxL, N)[:, index]
  return y_BxPxN, valid_BxPxN


def sampled_chunk_terms(samples_SxBxPxK, tokens_BxL, mask_BxL):
  """K >= 4: Brier-1..4 (sums_N, counts_N) from S >= 2 sampled chunks per position.

  Position t of the block holds the samples of chunk t+1 (given true chunks 0..t); its
  n-token target is the first n tokens of the true chunk t+1. With S = 2 this is the
  reference's eval_brier (patch_size >= 4 branch) on the decoder's argmax samples; more
  samples give the same expectation with less variance (brier.multi_sample_estimates).
  """
  k = samples_SxBxPxK.shape[-1]
  if k < N:
    raise ValueError(f"sampled_chunk_terms needs K >= {N} tokens per chunk, got K={k}.")
  y_BxPxN, valid_BxPxN = _targets_and_valid(tokens_BxL, mask_BxL, k, samples_SxBxPxK.shape[2], k)
  return brier.multi_sample_terms(samples_SxBxPxK[..., :N], y_BxPxN, valid_BxPxN)


def calm_terms(model, params, batch, rng, num_samples=2):
  """CALM Brier-1..4 (sums_N, counts_N) and the summed head loss: (sums_N, counts_N, loss_sum, loss_count)."""
  variables = {"params": params}
  k = model.config.patch_size
  tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
  mask_BxL = jnp.asarray(batch["mask"], jnp.int32)
  b, length = tokens_BxL.shape
  num_chunks = length // k
  positions = num_chunks - 1
  m = math.ceil(N / k)
  rng_loss, rng_sample, rng_extra = jax.random.split(rng, 3)

  # The head's own loss (energy score for the energy head) as in training, masked mean * count.
  _, metrics = model.apply(variables, batch, train=False, rngs={"sample": rng_loss})
  loss_count = metrics["valid_fraction"] * (b * positions)
  loss_sum = metrics["loss"] * loss_count

  chunks_BxTxK = tokens_BxL.reshape(b, num_chunks, k)
  cache = model.apply(variables, b, positions, method=model.init_cache)
  h_BxPxD, cache = model.apply(variables, chunks_BxTxK[:, :positions], cache, method=model.extend)
  samples_SxBxPxK = _sample_chunks(model, variables, h_BxPxD, rng_sample, num_samples)
  if k >= N:
    return (*sampled_chunk_terms(samples_SxBxPxK, tokens_BxL, mask_BxL), loss_sum, loss_count)
  y_BxPxN, valid_BxPxN = _targets_and_valid(tokens_BxL, mask_BxL, k, positions, k)

  # Accuracy: each sample's teacher-forced chunks t+1 .. t+m laid end to end, 2/S of their sum
  # (2 1{x = y} per sample pair, as the two-sample estimator).
  eq = lambda a, c: jnp.cumprod((a == c).astype(jnp.float32), axis=-1)
  windows = lambda s_BxPxK: brier.ngram_windows(s_BxPxK.reshape(b, positions * k), N, fill=-1)[:, ::k]
  accuracy_BxPxN = sum(eq(windows(s), y_BxPxN) for s in samples_SxBxPxK) * (2.0 / num_samples)

  # Collision: m-1 further chunks along sample 1's path, all positions at once from the one
  # prefix cache (position t's branch continues after chunk t).
  branches = model.apply(variables, method=model.init_branches)
  x_BxPxK, same = samples_SxBxPxK[0], [samples_SxBxPxK[0] == samples_SxBxPxK[1]]
  for j in range(1, m):
    h_BxPxD, branches = model.apply(variables, x_BxPxK, cache, branches,
                                    method=model.extend_branches)
    x_BxPxK, other_BxPxK = _sample_chunks(model, variables, h_BxPxD,
                                          jax.random.fold_in(rng_extra, j))
    same.append(x_BxPxK == other_BxPxK)
  same_BxPxN = jnp.concatenate(same, axis=-1)[..., :N]
  collision_BxPxN = jnp.cumprod(same_BxPxN.astype(jnp.float32), axis=-1)
  sums_N, counts_N = brier.masked_sums(accuracy_BxPxN - collision_BxPxN, valid_BxPxN)
  return sums_N, counts_N, loss_sum, loss_count


def _token_draws(model, variables, h_BxPxD, targets_BxP, key):
  """Per position, from the logits of h: log p(target), sum_v p_v^2 and two independent draws.

  The logits exist config.model.logits_chunk positions at a time (losses.map_chunks), never
  as a whole [B, P, V] float32 array; the draws of a chunk use fold_in(key, its first position).
  """

  def chunk(xs):
    logits = model.apply(variables, xs["h"], method=model.project).astype(jnp.float32)
    lse, collision = brier.softmax_stats(logits)
    target_logit = jnp.take_along_axis(logits, xs["y"][..., None], axis=-1)[..., 0]
    key1, key2 = jax.random.split(jax.random.fold_in(key, xs["index"][0, 0]))
    return {"target_logp": target_logit - lse, "collision": collision,
            "x1": brier.sample_categorical(key1, logits),
            "x2": brier.sample_categorical(key2, logits)}

  index_BxP = jnp.broadcast_to(jnp.arange(targets_BxP.shape[1]), targets_BxP.shape)
  return map_chunks(chunk, {"h": h_BxPxD, "y": targets_BxP, "index": index_BxP},
                    model.config.logits_chunk)


def ar_terms(model, params, batch, rng):
  """AR Brier-1..4 (sums_N, counts_N) and the summed next-token CE: (sums_N, counts_N, ce_sum, ce_count)."""
  variables = {"params": params}
  tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
  mask_BxL = jnp.asarray(batch["mask"], jnp.int32)
  b, length = tokens_BxL.shape
  positions = length - 1          # position t predicts token t+1
  cache = model.apply(variables, b, positions, method=model.init_cache)
  h_BxPxD, cache = model.apply(variables, tokens_BxL[:, :positions], cache,
                               method=model.extend_states)
  first = _token_draws(model, variables, h_BxPxD, tokens_BxL[:, 1:], jax.random.fold_in(rng, 0))
  ce_weight_BxP = mask_BxL[:, 1:].astype(jnp.float32)
  ce_sum = -jnp.sum(first["target_logp"] * ce_weight_BxP)
  ce_count = jnp.sum(ce_weight_BxP)
  valid_BxPxN = brier.ngram_valid(mask_BxL[:, 1:], N)
  target_logp_BxPxN = brier.ngram_windows(first["target_logp"], N, fill=0.0)

  # Further tokens along sample 1's path, all positions at once from the one prefix cache
  # (only the first N-1 tokens of each sample matter).
  x1, x2, coll = [first["x1"]], [first["x2"]], [first["collision"]]
  branches = model.apply(variables, method=model.init_branches)
  for j in range(1, N):
    h_BxPxD, branches = model.apply(variables, x1[-1], cache, branches,
                                    method=model.extend_branches)
    step = _token_draws(model, variables, h_BxPxD, jnp.zeros_like(x1[-1]),
                        jax.random.fold_in(rng, j))
    x1.append(step["x1"])
    x2.append(step["x2"])
    coll.append(step["collision"])
  sums_N, counts_N = brier.ar_brier_terms(target_logp_BxPxN, jnp.stack(x1, -1), jnp.stack(x2, -1),
                                          jnp.stack(coll, -1), valid_BxPxN)
  return sums_N, counts_N, ce_sum, ce_count
