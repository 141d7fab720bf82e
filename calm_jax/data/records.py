"""Records of text files: DataError, opening plain / .gz / .zst files, parsing one line, counting bad lines.

A line of a `jsonl:` file is one JSON object whose `field` holds the document; a line of a
`lines:` file is the document itself. A bad line (invalid JSON, a missing or non-string
field, text that is not valid UTF-8) is skipped and counted by BadRecords, which names the
first few file:line positions and fails only when more than `max_bad_fraction` of the lines
read are bad (config.data.max_bad_fraction).
"""
import gzip
import io
import json
import logging

from calm_jax import errors

COMPRESSED_SUFFIXES = (".gz", ".zst")
_READ_BUFFER = 1 << 20
FIRST_BAD = 5           # positions kept (logged, and named in the error)
_MIN_LINES_TO_JUDGE = 1000   # a stream is judged once this many lines are read (or at its end)


class DataError(errors.UserError, ValueError):
  """A data SPEC is invalid or names data that is missing or malformed."""


def is_compressed(path):
  return path.endswith(COMPRESSED_SUFFIXES)


def open_binary(path):
  """A buffered binary reader of `path`'s bytes, decompressed when it ends in .gz or .zst."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    raw = open(path, "rb")  # pylint: disable=consider-using-with
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                         closefd=True)
    return io.BufferedReader(reader, buffer_size=_READ_BUFFER)
  return open(path, "rb", buffering=_READ_BUFFER)  # pylint: disable=consider-using-with


def skip_bytes(f, path, offset):
  """Moves reader f to uncompressed byte `offset` (a seek, or reading and dropping for .gz/.zst)."""
  if not is_compressed(path):
    f.seek(offset)
    return
  left = offset
  while left > 0:
    chunk = f.read(min(left, _READ_BUFFER))
    if not chunk:
      raise DataError(f"{path} is shorter than the {offset} bytes a checkpoint read from it; "
                      "the file changed since: restore it or start a new workdir.")
    left -= len(chunk)


def text_or_none(value):
  """bytes/str -> str, or None if not valid UTF-8 (a str with lone surrogates counts as invalid)."""
  try:
    if isinstance(value, bytes):
      return value.decode("utf-8")
    value.encode("utf-8")
    return value
  except UnicodeError:
    return None


def parse_line(line, field):
  """One line (bytes, no newline) -> (text, None), or (None, why it is bad).

  field=None: the line is the document (plain text); else a JSON object's string field.
  """
  if field is None:
    text = text_or_none(line.rstrip(b"\r"))
    return (text, None) if text is not None else (None, "not valid UTF-8")
  try:
    record = json.loads(line)
  except UnicodeDecodeError:
    return None, "not valid UTF-8"
  except ValueError as e:
    return None, f"malformed JSON ({e})"
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    return None, (f"expected a JSON object with a string field {field!r} "
                  "(use jsonl:GLOB#FIELD for another field)")
  text = text_or_none(record[field])
  return (text, None) if text is not None else (None, "not valid UTF-8")


class BadRecords:
  """Counts the lines of a source read so far: documents, empty lines and bad ones."""

  def __init__(self, what, max_fraction):
    self.what = what
    self.max_fraction = max_fraction
    self.lines = self.empty = self.bad = 0
    self.first = []      # 'file:line: why' of the first few bad lines
    self._logged = 0

  def count(self, text, where=None, why=None):
    """Counts one line: text (a document), '' / whitespace (empty) or None (bad: where, why)."""
    self.lines += 1
    if text is None:
      self.bad += 1
      if len(self.first) < FIRST_BAD:
        self.first.append(f"{where}: {why}")
    elif not text.strip():
      self.empty += 1

  def add(self, lines, empty, bad, first):
    """Adds the counts of a part read elsewhere (an index chunk, a prepare worker)."""
    self.lines += lines
    self.empty += empty
    self.bad += bad
    self.first.extend(first[:FIRST_BAD - len(self.first)])

  def check(self, final=False):
    """Raises DataError if too many lines are bad; else logs the bad positions not logged yet.

    A stream is judged once _MIN_LINES_TO_JUDGE lines are read or at its end (final).
    """
    if not self.bad or not (final or self.lines >= _MIN_LINES_TO_JUDGE):
      return
    if self.bad > self.max_fraction * self.lines:
      raise DataError(
          f"{self.first[0]}; {self.bad} of {self.lines} lines of {self.what} are bad, more than "
          f"max_bad_fraction={self.max_fraction}: fix the data or raise "
          "config.data.max_bad_fraction (calm-prepare/calm-tokenizer: --max_bad_fraction).")
    for position in self.first[self._logged:]:
      logging.warning("Skipping a bad line: %s", position)
    self._logged = len(self.first)

  def log_summary(self):
    if self.bad or self.empty:
      logging.warning("%s: skipped %d empty and %d bad lines of %d.", self.what, self.empty,
                      self.bad, self.lines)
