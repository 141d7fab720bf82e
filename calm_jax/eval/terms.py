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
    The extra steps run without copying any cache: the teacher-forced pass fills a KV
    cache of the whole block, which every position then reads (keys 0..t for position
    t) while it appends its own chunks to a small per-position suffix
    (model.extend_branches).
Chunks of positions: after the teacher-forced pass, everything per position (the vocabulary
projection or the head's samples decoded by the frozen autoencoder, the extra steps) runs
config.model.logits_chunk positions at a time (losses.map_chunks), so the logits and the
suffixes of one chunk exist at once, never the [B, P, (K,) V] logits of the block.
AR baseline (the paper's lower-variance estimator, brier.ar_brier_terms): the
accuracy term is the exact teacher-forced product of probabilities; the
collision term multiplies 1{x1[:n-1] = x2[:n-1]} (sampled the same way, from the
state along sample 1's path) by the exact sum_v p(v | x1[:n-1])^2. Plus the
summed cross-entropy for perplexity. The AR continuations run like CALM's (shared prefix
cache, per-position suffixes, chunks of positions). The random draws of a chunk of
positions come from fold_in(key, its first position).
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


def _calm_chunk(model, variables, cache, k, num_samples, keys):
  """Per chunk of positions: the head's samples [B, C, S, K] and, for K < 4, whether the
  two continuations along sample 1's path agree on each of the N tokens [B, C, N]."""
  m = math.ceil(N / k)

  def chunk(xs):
    start = xs["index"][0, 0]
    samples_SxBxCxK = _sample_chunks(model, variables, xs["h"], jax.random.fold_in(keys[0], start),
                                     num_samples)
    out = {"samples": jnp.moveaxis(samples_SxBxCxK, 0, 2)}
    if k >= N:
      return out
    branches = model.apply(variables, start, method=model.init_branches)
    x_BxCxK, same = samples_SxBxCxK[0], [samples_SxBxCxK[0] == samples_SxBxCxK[1]]
    for j in range(1, m):
      h_BxCxD, branches = model.apply(variables, x_BxCxK, cache, branches,
                                      method=model.extend_branches)
      x_BxCxK, other_BxCxK = _sample_chunks(
          model, variables, h_BxCxD, jax.random.fold_in(jax.random.fold_in(keys[1], j), start))
      same.append(x_BxCxK == other_BxCxK)
    out["same"] = jnp.concatenate(same, axis=-1)[..., :N]
    return out

  return chunk


def calm_terms(model, params, batch, rng, num_samples=2):
  """CALM Brier-1..4 (sums_N, counts_N) and the summed head loss: (sums_N, counts_N, loss_sum, loss_count)."""
  variables = {"params": params}
  k = model.config.patch_size
  tokens_BxL = jnp.asarray(batch["tokens"], jnp.int32)
  mask_BxL = jnp.asarray(batch["mask"], jnp.int32)
  b, length = tokens_BxL.shape
  num_chunks = length // k
  positions = num_chunks - 1
  rng_loss, rng_sample, rng_extra = jax.random.split(rng, 3)

  # The head's own loss (energy score for the energy head) as in training, masked mean * count.
  _, metrics = model.apply(variables, batch, train=False, rngs={"sample": rng_loss})
  loss_count = metrics["valid_fraction"] * (b * positions)
  loss_sum = metrics["loss"] * loss_count

  chunks_BxTxK = tokens_BxL.reshape(b, num_chunks, k)
  cache = model.apply(variables, b, positions, method=model.init_cache)
  h_BxPxD, cache = model.apply(variables, chunks_BxTxK[:, :positions], cache, method=model.extend)
  index_BxP = jnp.broadcast_to(jnp.arange(positions), (b, positions))
  out = map_chunks(_calm_chunk(model, variables, cache, k, num_samples, (rng_sample, rng_extra)),
                   {"h": h_BxPxD, "index": index_BxP}, model.config.logits_chunk)
  samples_SxBxPxK = jnp.moveaxis(out["samples"], 2, 0)
  if k >= N:
    return (*sampled_chunk_terms(samples_SxBxPxK, tokens_BxL, mask_BxL), loss_sum, loss_count)
  y_BxPxN, valid_BxPxN = _targets_and_valid(tokens_BxL, mask_BxL, k, positions, k)

  # Accuracy: each sample's teacher-forced chunks t+1 .. t+m laid end to end, 2/S of their sum
  # (2 1{x = y} per sample pair, as the two-sample estimator).
  eq = lambda a, c: jnp.cumprod((a == c).astype(jnp.float32), axis=-1)
  windows = lambda s_BxPxK: brier.ngram_windows(s_BxPxK.reshape(b, positions * k), N, fill=-1)[:, ::k]
  accuracy_BxPxN = sum(eq(windows(s), y_BxPxN) for s in samples_SxBxPxK) * (2.0 / num_samples)
  # Collision: m-1 further chunks along sample 1's path (_calm_chunk).
  collision_BxPxN = jnp.cumprod(out["same"].astype(jnp.float32), axis=-1)
  sums_N, counts_N = brier.masked_sums(accuracy_BxPxN - collision_BxPxN, valid_BxPxN)
  return sums_N, counts_N, loss_sum, loss_count


def _token_draws(model, variables, h_BxCxD, targets_BxC, key):
  """From the logits of h: log p(target), sum_v p_v^2 and two independent draws, per position."""
  logits = model.apply(variables, h_BxCxD, method=model.project).astype(jnp.float32)
  lse, collision = brier.softmax_stats(logits)
  target_logit = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
  key1, key2 = jax.random.split(key)
  # The barrier: every result before any is used, so the logits die before the next step's.
  return jax.lax.optimization_barrier({
      "target_logp": target_logit - lse, "collision": collision,
      "x1": brier.sample_categorical(key1, logits), "x2": brier.sample_categorical(key2, logits)})


def _ar_chunk(model, variables, cache, rng):
  """Per chunk of positions: log p(target), and along sample 1's path the N tokens of both
  samples and the N exact collision probabilities [B, C, N]."""

  def chunk(xs):
    start = xs["index"][0, 0]
    key = lambda j: jax.random.fold_in(jax.random.fold_in(rng, j), start)
    first = _token_draws(model, variables, xs["h"], xs["y"], key(0))
    steps = [first]
    branches = model.apply(variables, start, method=model.init_branches)
    for j in range(1, N):          # only the first N-1 tokens of each sample matter
      h_BxCxD, branches = model.apply(variables, steps[-1]["x1"], cache, branches,
                                      method=model.extend_branches)
      steps.append(_token_draws(model, variables, h_BxCxD, jnp.zeros_like(xs["y"]), key(j)))
    stack = lambda name: jnp.stack([s[name] for s in steps], axis=-1)
    return {"target_logp": first["target_logp"], "x1": stack("x1"), "x2": stack("x2"),
            "collision": stack("collision")}

  return chunk


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
  index_BxP = jnp.broadcast_to(jnp.arange(positions), (b, positions))
  out = map_chunks(_ar_chunk(model, variables, cache, rng),
                   {"h": h_BxPxD, "y": tokens_BxL[:, 1:], "index": index_BxP},
                   model.config.logits_chunk)
  ce_weight_BxP = mask_BxL[:, 1:].astype(jnp.float32)
  ce_sum = -jnp.sum(out["target_logp"] * ce_weight_BxP)
  ce_count = jnp.sum(ce_weight_BxP)
  sums_N, counts_N = brier.ar_brier_terms(
      brier.ngram_windows(out["target_logp"], N, fill=0.0), out["x1"], out["x2"],
      out["collision"], brier.ngram_valid(mask_BxL[:, 1:], N))
  return sums_N, counts_N, ce_sum, ce_count
