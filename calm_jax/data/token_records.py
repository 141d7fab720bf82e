"""calm-prepare's ArrayRecord shards (encoding, a source with an id check) and PartIndex over parts laid end to end.

PartIndex (and Concatenation on it) also serves the line files of a source and SPEC,SPEC mixtures.
A record holds the token ids of one document as little-endian int32 bytes, no header
(written by prepare.py, read by ArrayRecordSource).
"""
import bisect

import numpy as np

from calm_jax.data import records

TOKEN_DTYPE = np.dtype("<i4")
ARRAYRECORD_SUFFIX = ".array_record"
_ID_SAMPLE = 64     # records whose ids are checked when the source opens


def encode_tokens(ids):
  """Token ids -> one ArrayRecord record (little-endian int32 bytes)."""
  return np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()


def decode_tokens(record):
  """One ArrayRecord record -> int32[n] token ids."""
  return np.frombuffer(record, dtype=TOKEN_DTYPE).astype(np.int32, copy=False)


class PartIndex:
  """One index over parts of the given sizes laid end to end (files of a source, sources of a
  mixture): index i <-> (part, index within that part)."""

  def __init__(self, sizes):
    self._starts = np.cumsum([0] + list(sizes)).tolist()

  def __len__(self):
    return self._starts[-1]

  def locate(self, index):
    """index (negative from the end) -> (part, index within that part)."""
    if index < 0:
      index += len(self)
    part = bisect.bisect_right(self._starts, index) - 1
    return part, index - self._starts[part]


class Concatenation(PartIndex):
  """Random-access sources read one after another (index i runs through them in order)."""

  def __init__(self, parts):
    self.parts = list(parts)
    super().__init__(len(p) for p in self.parts)

  def __getitem__(self, index):
    part, local = self.locate(index)
    return self.parts[part][local]


class ArrayRecordSource:
  """calm-prepare shards: one int32 token-id array per document.

  With vocab_size, ids must lie in [0, vocab_size): a sample of records is checked when
  the source opens and every record when it is read, so shards prepared with another
  tokenizer fail naming the file, the record and the id instead of training into NaN.
  """

  def __init__(self, paths, vocab_size=None):
    import grain  # pylint: disable=g-import-not-at-top
    self._paths = list(paths)
    self._files = Concatenation(grain.sources.ArrayRecordDataSource([p]) for p in self._paths)
    self._vocab_size = vocab_size
    if vocab_size:
      for index in np.linspace(0, len(self) - 1, num=min(len(self), _ID_SAMPLE), dtype=int):
        self[int(index)]

  def __len__(self):
    return len(self._files)

  def __getitem__(self, index):
    part, local = self._files.locate(index)
    ids = decode_tokens(self._files.parts[part][local])
    if self._vocab_size and ids.size and (ids.max() >= self._vocab_size or ids.min() < 0):
      bad = int(ids[(ids >= self._vocab_size) | (ids < 0)][0])
      raise records.DataError(
          f"{self._paths[part]} record {local}: token id {bad} is outside "
          f"the vocabulary of {self._vocab_size} ids (config.data.vocab_size, the tokenizer's): "
          "the shards were prepared with another tokenizer. Prepare them again with this "
          "config.data.tokenizer (calm-prepare), or set config.data.tokenizer to theirs.")
    return ids
