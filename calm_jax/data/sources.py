"""Data SPEC strings -> document sources: random access (len + getitem) or streaming.

A SPEC names one corpus; several SPECs joined with ',' form a mixture:

  builtin:python_docs[:train|valid|all]   the built-in corpus (default split: train)
  jsonl:GLOB[#field]                      one JSON object per line, text in `field` (default
                                          'text'); plain, .gz or .zst
  lines:GLOB                              one document per line of plain text; plain, .gz or .zst
  text:GLOB                               one document per file (UTF-8; plain, .gz or .zst)
  parquet:GLOB[#column]                   Parquet files, text in `column` (default 'text'), read
                                          row group by row group
  tfds:NAME[/CONFIG][:VERSION]:SPLIT[#field]
                                          a prepared TFDS dataset (array_record format) read
                                          through tfds.data_source; data_dir = $TFDS_DATA_DIR
                                          or TFDS's default; text in `field` (default 'text')
  arrayrecord:GLOB                        calm-prepare output: token ids (a directory means
                                          DIR/*.array_record)

Uncompressed jsonl/lines files are read through a line-offset index (line_index.py: a
sidecar file made once) and give random access, like builtin, text, tfds and arrayrecord;
.gz/.zst line files and Parquet are streamed in order (streams.py). Text sources yield
`str` documents; arrayrecord yields int32 token-id arrays.

Mixtures: 'A,B' without weights is the concatenation of random-access sources (every
document once per epoch, each component's share is its size; the pipeline shuffles the
whole). 'A@0.7,B@0.3' gives every component a weight: the pipeline packs each component on
its own and mixes the packed sequences in these proportions (grain's mix: deterministic and
resumable); streaming sources can only be mixed with weights. Relative globs resolve
against the current directory. A bad line (invalid JSON, a missing field, not UTF-8) is
skipped and counted; more than max_bad_fraction of bad lines fails (records.py).
"""
import dataclasses
import glob
import logging
import mmap
import os
import re

import numpy as np

from calm_jax.data import builtin
from calm_jax.data import line_index
from calm_jax.data import records
from calm_jax.data import streams
from calm_jax.data import token_records

SCHEMES = ("builtin", "jsonl", "lines", "text", "parquet", "tfds", "arrayrecord")
_MAX_WARNINGS = 10  # per source, for skipped records
DataError = records.DataError
# The ArrayRecord token shards (token_records.py), named here for the callers of sources.
TOKEN_DTYPE, ARRAYRECORD_SUFFIX = token_records.TOKEN_DTYPE, token_records.ARRAYRECORD_SUFFIX
encode_tokens, decode_tokens = token_records.encode_tokens, token_records.decode_tokens
ArrayRecordSource = token_records.ArrayRecordSource
_WEIGHT = re.compile(r"^(.*)@\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$", re.S)


def _log_skipped(what, empty, invalid):
  if empty or invalid:
    logging.warning("%s: skipped %d empty and %d non-UTF-8 documents.", what, empty, invalid)


def expand_glob(scheme, pattern, suffix=""):
  """Sorted absolute paths matching `pattern` (a directory: its *suffix files).

  Line-offset index sidecars (line_index.py) beside the data never match.
  """
  pattern = os.path.expanduser(pattern)
  if suffix and os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*" + suffix)
  paths = sorted(os.path.abspath(p) for p in glob.glob(pattern)
                 if os.path.isfile(p) and not line_index.is_sidecar(p))
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


class LinesSource:
  """Documents of uncompressed line files (jsonl: field of a JSON object; lines: the line),
  random access through each file's line-offset index (line_index.py)."""

  def __init__(self, scheme, paths, field, max_bad_fraction):
    self._paths = paths
    self._field = field
    bad = records.BadRecords(f"{scheme}:{paths[0]}" + (
        f" (+{len(paths) - 1} files)" if len(paths) > 1 else ""), max_bad_fraction)
    sizes = []
    for path in paths:
      offsets, counts = line_index.load(path, field)
      bad.add(counts["lines"], counts["empty"], counts["bad"], counts["first"])
      sizes.append(len(offsets))
    bad.check(final=True)
    bad.log_summary()
    self._index = token_records.PartIndex(sizes)
    self._offsets = {}
    self._maps = {}

  def __len__(self):
    return len(self._index)

  def __getitem__(self, index):
    file_id, line = self._index.locate(index)
    if file_id not in self._maps:
      path = self._paths[file_id]
      self._offsets[file_id] = line_index.load(path, self._field)[0]
      with open(path, "rb") as f:
        self._maps[file_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    start, end = self._offsets[file_id][line]
    return records.parse_line(self._maps[file_id][start:end], self._field)[0]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_maps"] = {}     # memory maps do not pickle; reopened on access
    state["_offsets"] = {}
    return state


class TextSource:
  """One document per UTF-8 text file."""

  def __init__(self, paths):
    self._paths = []
    empty = invalid = 0
    for path in paths:
      with records.open_binary(path) as f:
        text = records.text_or_none(f.read())
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
    with records.open_binary(self._paths[index]) as f:
      return f.read().decode("utf-8")


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
    text = records.text_or_none(self._source[index][self._field])
    if text is None or not text.strip():
      self.skipped += 1
      if self.skipped <= _MAX_WARNINGS:
        logging.warning("%s: skipping record %d (empty or not UTF-8).", self._spec, index)
      return ""
    return text


# The concatenation of several sources (SPEC,SPEC without weights).
MixtureSource = token_records.Concatenation


def split_field(body, default="text"):
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


@dataclasses.dataclass(frozen=True)
class WeightedMixture:
  """Components mixed by weight (SPEC@w,...): the pipeline mixes their packed sequences."""
  sources: tuple
  weights: tuple


def is_stream(source):
  return isinstance(source, streams.StreamSource)


def _lines_source(scheme, pattern, field, max_bad_fraction, check_only):
  paths = expand_glob(scheme, pattern)
  if check_only:
    return None
  if any(records.is_compressed(p) for p in paths):
    return streams.StreamSource(scheme, paths, field, max_bad_fraction)
  return LinesSource(scheme, paths, field, max_bad_fraction)


def _parse_one(spec, max_bad_fraction, check_only, vocab_size=None):
  """One SPEC (no ',', no weight) -> a source, or None when check_only (globs/scheme checked only)."""
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
    body, field = split_field(body)
    name, split = _parse_tfds(body)
    return None if check_only else TfdsSource(name, split, field)
  if scheme in ("jsonl", "lines"):
    pattern, field = split_field(body) if scheme == "jsonl" else (body, None)
    return _lines_source(scheme, pattern, field, max_bad_fraction, check_only)
  if scheme == "parquet":
    pattern, column = split_field(body)
    paths = expand_glob(scheme, pattern)
    return None if check_only else streams.StreamSource(scheme, paths, column, max_bad_fraction)
  if scheme == "text":
    paths = expand_glob(scheme, body)
    return None if check_only else TextSource(paths)
  paths = expand_glob(scheme, body, suffix=ARRAYRECORD_SUFFIX)
  return None if check_only else ArrayRecordSource(paths, vocab_size)


def split_specs(spec):
  """A SPEC -> [(one SPEC, weight or None)]; weights are all given or none."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise DataError("The data SPEC is empty; give e.g. builtin:python_docs or jsonl:DIR/*.jsonl.")
  weighted = []
  for part in parts:
    match = _WEIGHT.match(part)
    weighted.append((match.group(1).strip(), float(match.group(2))) if match else (part, None))
  given = [w is not None for _, w in weighted]
  if any(given) and not all(given):
    raise DataError(f"{spec!r} gives weights to some components only; give every component "
                    "one (SPEC@0.7,SPEC@0.3) or none (concatenation).")
  if any(w is not None and w <= 0 for _, w in weighted):
    raise DataError(f"{spec!r} has a weight <= 0; weights must be positive.")
  return weighted


def check_spec(spec):
  """Validates a SPEC cheaply (schemes known, globs match files) without reading data."""
  for part, _ in split_specs(spec):
    _parse_one(part, max_bad_fraction=0.0, check_only=True)


def parse_spec(spec, max_bad_fraction=0.0, vocab_size=None):
  """A SPEC -> a source: random access, a StreamSource, or a WeightedMixture of them.

  max_bad_fraction: the fraction of bad lines tolerated (skipped and counted) before failing.
  vocab_size: token-id sources (arrayrecord) check their ids against it.
  """
  parts = split_specs(spec)
  sources = [_parse_one(p, max_bad_fraction, check_only=False, vocab_size=vocab_size)
             for p, _ in parts]
  if parts[0][1] is not None:
    return WeightedMixture(tuple(sources), tuple(w for _, w in parts))
  if len(sources) == 1:
    return sources[0]
  if any(is_stream(s) for s in sources):
    raise DataError(f"{spec!r} mixes streaming sources (.gz/.zst or parquet) without weights; "
                    "give every component a weight: SPEC@0.5,SPEC@0.5.")
  return MixtureSource(sources)


def _texts(source, rng):
  """Every text document of one source once: random order, or stream order (files shuffled)."""
  if is_stream(source):
    yield from source.texts(seed=int(rng.integers(1 << 31)))
    return
  for index in rng.permutation(len(source)):
    text = source[int(index)]
    if text:
      yield text


def iter_texts(spec, max_bad_fraction=0.0, seed=0):
  """Yields the text documents of a SPEC in a seeded random order (for tokenizer training).

  The order is random so that a prefix (the tokenizer's max_chars) is a fair sample;
  streaming sources come in file order (the files shuffled), weighted components are
  drawn by weight until each is used up.
  """
  if any(p.startswith("arrayrecord:") for p, _ in split_specs(spec)):
    raise DataError(
        f"{spec!r} includes arrayrecord token ids; train the tokenizer on the text SPEC "
        "the shards were prepared from.")
  source = parse_spec(spec, max_bad_fraction)
  rng = np.random.default_rng(seed)
  if not isinstance(source, WeightedMixture):
    yield from _texts(source, rng)
    return
  its = [_texts(s, rng) for s in source.sources]
  weights = np.asarray(source.weights, np.float64)
  while its:
    pick = int(rng.choice(len(its), p=weights / weights.sum()))
    text = next(its[pick], None)
    if text is None:
      del its[pick]
      weights = np.delete(weights, pick)
    else:
      yield text
