"""The unigram baseline: training-token frequencies and their Brier-n at a model's eval positions.

A model that has learned nothing about context can still sample tokens by their
frequency. Its Brier-n at a position with true continuation y_1..y_n is exact:

  2 prod_j p(y_j) - (sum_v p(v)^2)^n        (tokens drawn independently from p),

so every BrierLM is reported beside the unigram one of the same positions
(`calm-eval`, the quickstart, calm-diagnose): a CALM or AR run below it has not
learned the data. p comes from the first `max_tokens` real tokens of the
training split, as the model saw them (same tokenizer and packing); where the
training data cannot be read here (a converted reference run trained on the Pile),
from the eval data itself, which favours the baseline and says so in `source`.
"""
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from calm_jax.eval import brier
from calm_jax.data import pipeline
from calm_jax.data import sources


# (data config JSON, vocab size, max_tokens) -> (tokenizer, (p_V, source)): a run evaluated at
# several checkpoints (the quality benchmark) reads its training tokens once.
_FREQUENCIES = {}


def token_frequencies(config, tokenizer, max_tokens):
  """(p_V float64, source): frequencies of the first max_tokens real training tokens.

  source is "train", or "eval" with a warning when the training data cannot be read.
  Remembered for the same data config, vocabulary, budget and tokenizer object.
  """
  key = (config.data.to_json(), config.model.vocab_size, max_tokens)
  if key not in _FREQUENCIES or _FREQUENCIES[key][0] is not tokenizer:
    _FREQUENCIES[key] = (tokenizer, _read_frequencies(config, tokenizer, max_tokens))
  return _FREQUENCIES[key][1]


def _read_frequencies(config, tokenizer, max_tokens):
  try:
    return split_frequencies(config, tokenizer, max_tokens, "train"), "train"
  except sources.DataError as e:
    logging.warning("unigram baseline: the training data cannot be read (%s); its "
                    "frequencies come from the eval data instead.", e)
    return split_frequencies(config, tokenizer, max_tokens, "eval"), "eval"


def split_frequencies(config, tokenizer, max_tokens, split):
  """p_V (float64) of the first max_tokens real tokens (mask 1) of `split`, all processes."""
  counts_V = np.zeros(config.model.vocab_size, np.float64)
  seen = 0
  for batch in pipeline.make_iterator(config, tokenizer, split):
    tokens = np.asarray(batch["tokens"])[np.asarray(batch["mask"]) > 0]
    counts_V += np.bincount(tokens, minlength=counts_V.size)
    seen += tokens.size
    if seen >= max_tokens:
      break
  counts_V = all_processes_sum(counts_V)
  return counts_V / max(counts_V.sum(), 1.0)


def all_processes_sum(x):
  """x summed over every process (each process reads its own documents); x itself on one."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def brier_sums(p_V, tokens_BxL, mask_BxL, start, stride, n_max=brier.MAX_N):
  """(sums_N, counts_N) of the unigram Brier-1..n_max at positions start, start+stride, ...

  Position i's n-token target is tokens[start + stride*i : ... + n], counted for n when
  those tokens lie in the block with mask 1 (brier.ngram_valid): the positions the
  model's own estimator uses (CALM: start=stride=K; AR: start=1, stride=1).
  """
  tokens_BxL, mask_BxL = np.asarray(tokens_BxL, np.int32), np.asarray(mask_BxL)
  index = np.arange(start, tokens_BxL.shape[1], stride)
  y_BxPxN = np.asarray(brier.ngram_windows(tokens_BxL, n_max))[:, index]
  valid_BxPxN = np.asarray(brier.ngram_valid(mask_BxL, n_max))[:, index]
  p_y = np.cumprod(p_V[y_BxPxN], axis=-1)
  collision_N = np.sum(np.square(p_V)) ** np.arange(1, n_max + 1)
  est_BxPxN = 2.0 * p_y - collision_N
  sums_N = np.sum(np.where(valid_BxPxN, est_BxPxN, 0.0).reshape(-1, n_max), axis=0)
  counts_N = np.sum(valid_BxPxN.reshape(-1, n_max), axis=0)
  return sums_N, counts_N
