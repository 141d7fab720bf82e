"""Data SPEC strings -> random-access document sources (len + getitem).

A SPEC names one corpus; several SPECs joined with ',' form a mixture:

  builtin:python_docs[:train|valid|all]   the built-in corpus (default split: train)
  jsonl:GLOB[#field]                      one JSON object per line, text in `field` (default 'text')
  text:GLOB                               one document per file (UTF-8)
  tfds:NAME[/CONFIG][:VERSION]:SPLIT[#field]
                                          a prepared TFDS dataset (array_record format) read
                                          through tfds.data_source; data_dir = $TFDS_DATA_DIR
                                          or TFDS's default; text in `field` (default 'text')
  arrayrecord:GLOB                        calm-prepare output: token ids (a directory means
                                          DIR/*.array_record)

Text sources yield `str` documents; arrayrecord yields int32 token-id arrays.
A mixture is the concatenation of its components: every document of every
component appears once per epoch, so each component's share is its size (the
pipeline shuffles the whole). Relative globs resolve against the current
directory. Empty documents and documents that are not valid UTF-8 are skipped
and counted in the log.
"""
import bisect
import glob
import json
import logging
import mmap
import os

import numpy as np

from calm_jax import errors
from calm_jax.data import builtin

SCHEMES = ("builtin", "jsonl", "text", "tfds", "arrayrecord")
# ArrayRecord record encoding (written by prepare.py, read here): the token ids
# of one document as little-endian int32 bytes, no header.
TOKEN_DTYPE = np.dtype("<i4")
ARRAYRECORD_SUFFIX = ".array_record"
_MAX_WARNINGS = 10  # per source, for skipped records
_ID_SAMPLE = 64     # arrayrecord records whose ids are checked when the source opens


class DataError(errors.UserError, ValueError):
  """A data SPEC is invalid or names data that is missing or malformed."""


def encode_tokens(ids):
  """Token ids -> one ArrayRecord record (little-endian int32 bytes)."""
  return np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()


def decode_tokens(record):
  """One ArrayRecord record -> int32[n] token ids."""
  return np.frombuffer(record, dtype=TOKEN_DTYPE).astype(np.int32, copy=False)


def _valid_text(data):
  """bytes -> str, or None if not valid UTF-8 (str input: None if it holds lone surrogates)."""
  try:
    if isinstance(data, bytes):
      return data.decode("utf-8")
    data.encode("utf-8")
    return data
  except UnicodeError:
    return None


def _log_skipped(what, empty, invalid):
  if empty or invalid:
    logging.warning("%s: skipped %d empty and %d non-UTF-8 documents.", what, empty, invalid)


def _expand_glob(scheme, pattern, suffix=""):
  """Sorted absolute paths matching `pattern` (a directory: its *suffix files)."""
  pattern = os.path.expanduser(pattern)
  if suffix and os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*" + suffix)
  paths = sorted(os.path.abspath(p) for p in glob.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise DataError(
        f"{scheme}:{pattern} matches no files (relative paths resolve against "
        f"{os.getcwd()}); check the path in the data SPEC.")
  return paths


class BuiltinSource:
  """builtin:python_docs documents of one split."""

  def __init__(self, split):
    self._docs = builtin.documents(split)

  def __len__(self):
    return len(self._docs)

  def __getitem__(self, index):
    return self._docs[index][1]


class JsonlSource:
  """Documents of JSONL files; indexed once (byte offsets), lines parsed on access."""

  def __init__(self, paths, field, skip_bad_records):
    self._paths = paths
    self._field = field
    self._maps = {}
    file_ids, starts, ends = [], [], []
    empty = invalid = bad = 0
    for file_id, path in enumerate(paths):
      # Read line by line (not the whole file): memory stays flat in file size.
      with open(path, "rb") as f:
        start = 0
        for line_number, raw in enumerate(f, 1):
          line = raw[:-1] if raw.endswith(b"\n") else raw
          line_start, end = start, start + len(line)
          start += len(raw)
          if not line.strip():
            continue
          try:
            text = self._parse(line, path, line_number)
          except DataError as e:
            if not skip_bad_records:
              raise
            bad += 1
            if bad <= _MAX_WARNINGS:
              logging.warning("Skipping a bad record: %s", e)
            continue
          if text is None:
            invalid += 1
          elif not text.strip():
            empty += 1
          else:
            file_ids.append(file_id)
            starts.append(line_start)
            ends.append(end)
    self._file_ids = np.asarray(file_ids, np.int32)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)
    what = f"jsonl ({len(paths)} files from {os.path.dirname(paths[0])})"
    _log_skipped(what, empty, invalid)
    if bad:
      logging.warning("%s: skipped %d malformed lines (skip_bad_records).", what, bad)

  def _parse(self, line, path, line_number):
    """One JSONL line -> its text (None if not valid UTF-8); DataError if malformed."""
    try:
      record = json.loads(line)
    except UnicodeDecodeError:
      return None
    except ValueError as e:
      raise DataError(f"{path}:{line_number}: malformed JSON ({e}).") from None
    if not isinstance(record, dict) or not isinstance(record.get(self._field), str):
      raise DataError(
          f"{path}:{line_number}: expected a JSON object with a string field "
          f"{self._field!r} (use jsonl:GLOB#FIELD for another field).")
    return _valid_text(record[self._field])

  def __len__(self):
    return len(self._starts)

  def __getitem__(self, index):
    file_id = int(self._file_ids[index])
    if file_id not in self._maps:
      with open(self._paths[file_id], "rb") as f:
        self._maps[file_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    line = self._maps[file_id][self._starts[index]:self._ends[index]]
    return json.loads(line)[self._field]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_maps"] = {}  # memory maps do not pickle; reopened on access
    return state


class TextSource:
  """One document per UTF-8 text file."""

  def __init__(self, paths):
    self._paths = []
    empty = invalid = 0
    for path in paths:
      with open(path, "rb") as f:
        text = _valid_text(f.read())
      if text is None:
        invalid += 1
      elif not text.strip():
        empty += 1
      else:
        self._paths.append(path)
    _log_skipped(f"text ({len(paths)} files)", empty, invalid)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, index):
    with open(self._paths[index], encoding="utf-8") as f:
      return f.read()


class TfdsSource:
  """A prepared TFDS split read through tfds.data_source (no TensorFlow needed).

  Records that are not valid UTF-8 come back as '' and are dropped by the
  pipeline with the empty ones (counted here, logged on the first few).
  """

  def __init__(self, name, split, field):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises many types; all mean "not usable here"
      raise DataError(
          f"tfds:{name}:{split} cannot be opened from data_dir="
          f"{data_dir or 'TFDS default'} ({type(e).__name__}: {e}); prepare it "
          "(file_format='array_record') and set TFDS_DATA_DIR.") from e
    self._spec = f"tfds:{name}:{split}"
    self._field = field
    self.skipped = 0
    if len(self._source) and field not in self._source[0]:
      raise DataError(
          f"{self._spec} has no feature {field!r} (features: {sorted(self._source[0])}); "
          f"use {self._spec}#FIELD.")

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    text = _valid_text(self._source[index][self._field])
    if text is None or not text.strip():
      self.skipped += 1
      if self.skipped <= _MAX_WARNINGS:
        logging.warning("%s: skipping record %d (empty or not UTF-8).", self._spec, index)
      return ""
    return text


class ArrayRecordSource:
  """calm-prepare shards: one int32 token-id array per document.

  With vocab_size, ids must lie in [0, vocab_size): a sample of records is checked when
  the source opens and every record when it is read, so shards prepared with another
  tokenizer fail naming the file, the record and the id instead of training into NaN.
  """

  def __init__(self, paths, vocab_size=None):
    import grain  # pylint: disable=g-import-not-at-top
    self._paths = list(paths)
    self._files = [grain.sources.ArrayRecordDataSource([p]) for p in self._paths]
    self._offsets = np.cumsum([0] + [len(f) for f in self._files]).tolist()
    self._vocab_size = vocab_size
    if vocab_size:
      for index in np.linspace(0, len(self) - 1, num=min(len(self), _ID_SAMPLE), dtype=int):
        self[int(index)]

  def __len__(self):
    return self._offsets[-1]

  def __getitem__(self, index):
    if index < 0:
      index += len(self)
    part = bisect.bisect_right(self._offsets, index) - 1
    ids = decode_tokens(self._files[part][index - self._offsets[part]])
    if self._vocab_size and ids.size and (ids.max() >= self._vocab_size or ids.min() < 0):
      bad = int(ids[(ids >= self._vocab_size) | (ids < 0)][0])
      raise DataError(
          f"{self._paths[part]} record {index - self._offsets[part]}: token id {bad} is outside "
          f"the vocabulary of {self._vocab_size} ids (config.data.vocab_size, the tokenizer's): "
          "the shards were prepared with another tokenizer. Prepare them again with this "
          "config.data.tokenizer (calm-prepare), or set config.data.tokenizer to theirs.")
    return ids


class MixtureSource:
  """The concatenation of several sources (index i runs through them in order)."""

  def __init__(self, sources):
    self._sources = sources
    self._offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()

  def __len__(self):
    return self._offsets[-1]

  def __getitem__(self, index):
    if index < 0:
      index += len(self)
    part = bisect.bisect_right(self._offsets, index) - 1
    return self._sources[part][index - self._offsets[part]]


def _split_field(body, default="text"):
  body, _, field = body.partition("#")
  return body, field or default


def _parse_tfds(body):
  """'NAME[/CONFIG][:VERSION]:SPLIT' -> (name, split); the split may contain ':' ([:10%])."""
  head, sep, split = body.partition(":")
  if sep and split[:1].isdigit() and ":" in split:  # NAME:VERSION:SPLIT
    version, _, split = split.partition(":")
    head = f"{head}:{version}"
  if not sep or not head or not split:
    raise DataError(f"tfds:{body} must look like tfds:NAME[/CONFIG]:SPLIT, "
                    "e.g. tfds:wikipedia/20230601.en:train.")
  return head, split


def _parse_one(spec, skip_bad_records, check_only, vocab_size=None):
  """One SPEC (no ',') -> a source, or None when check_only (globs/scheme checked only)."""
  scheme, sep, body = spec.strip().partition(":")
  if not sep or scheme not in SCHEMES:
    raise DataError(
        f"Unknown data SPEC {spec!r}: the scheme must be one of "
        f"{', '.join(s + ':' for s in SCHEMES)} (see calm_jax/data/sources.py).")
  if scheme == "builtin":
    name, _, split = body.partition(":")
    if name != "python_docs" or (split or "train") not in builtin.SPLITS:
      raise DataError(
          f"Unknown builtin corpus {spec!r}; use builtin:python_docs[:train|valid|all].")
    return None if check_only else BuiltinSource(split or "train")
  if scheme == "tfds":
    body, field = _split_field(body)
    name, split = _parse_tfds(body)
    return None if check_only else TfdsSource(name, split, field)
  if scheme == "jsonl":
    pattern, field = _split_field(body)
    paths = _expand_glob(scheme, pattern)
    return None if check_only else JsonlSource(paths, field, skip_bad_records)
  if scheme == "text":
    paths = _expand_glob(scheme, body)
    return None if check_only else TextSource(paths)
  paths = _expand_glob(scheme, body, suffix=ARRAYRECORD_SUFFIX)
  return None if check_only else ArrayRecordSource(paths, vocab_size)


def _split_specs(spec):
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise DataError("The data SPEC is empty; give e.g. builtin:python_docs or jsonl:DIR/*.jsonl.")
  return parts


def check_spec(spec):
  """Validates a SPEC cheaply (schemes known, globs match files) without reading data."""
  for part in _split_specs(spec):
    _parse_one(part, skip_bad_records=False, check_only=True)


def parse_spec(spec, skip_bad_records=False, vocab_size=None):
  """A SPEC (',' = mixture) -> a random-access source of str or int32[n] documents.

  vocab_size: token-id sources (arrayrecord) check their ids against it.
  """
  sources = [_parse_one(p, skip_bad_records, check_only=False, vocab_size=vocab_size)
             for p in _split_specs(spec)]
  return sources[0] if len(sources) == 1 else MixtureSource(sources)


def iter_texts(spec, skip_bad_records=False, seed=0):
  """Yields the text documents of a SPEC in a seeded random order (for tokenizer training).

  The order is random so that a prefix (the tokenizer's max_chars) is a fair sample.
  """
  if any(p.startswith("arrayrecord:") for p in _split_specs(spec)):
    raise DataError(
        f"{spec!r} includes arrayrecord token ids; train the tokenizer on the text SPEC "
        "the shards were prepared from.")
  source = parse_spec(spec, skip_bad_records)
  for index in np.random.default_rng(seed).permutation(len(source)):
    text = source[int(index)]
    if text:
      yield text
