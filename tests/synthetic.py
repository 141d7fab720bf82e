"""Synthetic token corpora with a known answer, written as calm-prepare ArrayRecord shards.

`successor_corpus`: a fixed random table maps each of V symbols to its successor; every
document starts at a random symbol and follows the table (ids offset past the special ids).
Each token is a deterministic function of the one before it, so every K-token chunk is a
deterministic function of the previous chunk: a model that has learned the table predicts
the next chunk exactly (Brier-n -> 1), while the unigram model stays near 1/V.
"""
import os

from array_record.python import array_record_module
import numpy as np

from calm_jax.data import sources

FIRST_ID = 4          # ids 0..3 are PAD, UNK, BOS, EOS


def successor_documents(num_docs, length, vocab, table_seed, seed):
  """num_docs int32 arrays of `length` ids in [FIRST_ID, FIRST_ID + vocab).

  The successor table (a random permutation of the symbols) depends on table_seed only,
  so corpora written with the same table_seed and other seeds follow the same rule.
  """
  successor = np.random.default_rng(table_seed).permutation(vocab)
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(num_docs):
    x = np.empty(length, np.int64)
    x[0] = rng.integers(0, vocab)
    for i in range(1, length):
      x[i] = successor[x[i - 1]]
    docs.append((x + FIRST_ID).astype(np.int32))
  return docs


def write_corpus(directory, documents):
  """Writes documents as one ArrayRecord shard; returns the data SPEC that reads them."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "data-00000-of-00001" + sources.ARRAYRECORD_SUFFIX)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for ids in documents:
      writer.write(sources.encode_tokens(ids))
  finally:
    writer.close()
  return f"arrayrecord:{directory}"


def successor_corpus(directory, num_docs, length, vocab, table_seed, seed):
  """successor_documents written to `directory`; returns the SPEC."""
  return write_corpus(directory, successor_documents(num_docs, length, vocab, table_seed, seed))
