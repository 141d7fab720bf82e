"""Streaming sources (compressed line files, Parquet) and the checkpointable grain IterDataset over them.

A .gz / .zst line file cannot be indexed cheaply and a Parquet file is read row group by row
group, so they are read in order: StreamSource.read(file, position) yields the documents of
one file from a position, and StreamDataset walks the files (in a seeded order per epoch
when shuffled), keeps every process_count-th document for this process and repeats. Its
iterator state is {epoch, file, position, documents}: position is [uncompressed byte offset,
line number] of the next line (a row index twice for Parquet), so a restored iterator reopens
the file there (reading and dropping the compressed bytes before it) and yields exactly the
document it would have yielded. Memory stays flat in file size: one line, or one row group
of one column, at a time.
"""
import numpy as np
import grain

from calm_jax.data import records


def _read_lines(path, field, position):
  """Yields ([offset, line], text | None, why) for the lines of a (compressed) file from position."""
  offset, line_number = position
  try:
    with records.open_binary(path) as f:
      records.skip_bytes(f, path, offset)
      for raw in f:
        offset += len(raw)
        line_number += 1
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if not line.strip():
          yield [offset, line_number], "", None
          continue
        text, why = records.parse_line(line, field)
        yield [offset, line_number], text, why
  except (OSError, EOFError, ValueError) as e:  # truncated .gz, corrupt .zst frame
    raise records.DataError(
        f"{path}:{line_number + 1}: cannot be decompressed ({type(e).__name__}: {e}); "
        "replace the file or leave it out of the SPEC.") from e


def parquet_file(path):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
    raise records.DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e}); "
                            "replace it or leave it out of the SPEC.") from e


def check_parquet_column(path, column):
  names = parquet_file(path).schema_arrow.names
  if column not in names:
    raise records.DataError(f"parquet:{path} has no column {column!r} (columns: {names}); "
                            f"use parquet:GLOB#COLUMN.")


def parquet_text(value, column):
  """One Parquet cell -> (text, None), or (None, why it is bad): null, not text, not UTF-8."""
  if isinstance(value, bytes):
    value = records.text_or_none(value)
  if isinstance(value, str):
    return value, None
  return None, f"column {column!r} is not text ({value!r:.40})"


def _read_parquet(path, column, position):
  """Yields ([row, row], text | None, why) for the rows of a Parquet file from row position[0]."""
  parquet = parquet_file(path)
  first = 0
  for group in range(parquet.num_row_groups):
    rows = parquet.metadata.row_group(group).num_rows
    if position[0] < first + rows:
      values = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
      for i in range(max(0, position[0] - first), rows):
        yield [first + i + 1, first + i + 1], *parquet_text(values[i], column)
    first += rows


class StreamSource:
  """The documents of some files, read in order: scheme 'jsonl', 'lines' or 'parquet'."""

  def __init__(self, scheme, paths, field, max_bad_fraction):
    self.scheme = scheme
    self.paths = paths
    self.field = field
    self.max_bad_fraction = max_bad_fraction
    self.what = f"{scheme}:{paths[0]}" + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
    if scheme == "parquet":
      check_parquet_column(paths[0], field)

  def read(self, file_index, position=(0, 0)):
    """Yields (position after, text | None, why) for the records of file `file_index`."""
    path = self.paths[file_index]
    if self.scheme == "parquet":
      return _read_parquet(path, self.field, list(position))
    return _read_lines(path, None if self.scheme == "lines" else self.field, list(position))

  def texts(self, seed=None):
    """Every document once, files in order (seeded order if seed is given); bad lines counted."""
    bad = records.BadRecords(self.what, self.max_bad_fraction)
    order = _file_order(len(self.paths), seed)
    for file_index in order:
      for position, text, why in self.read(int(file_index)):
        bad.count(text, f"{self.paths[file_index]}:{position[1]}", why)
        bad.check()
        if text and text.strip():
          yield text
    bad.check(final=True)
    bad.log_summary()


def _file_order(count, seed):
  order = np.arange(count)
  if seed is not None:
    np.random.default_rng(seed).shuffle(order)
  return order


class StreamDataset(grain.IterDataset):
  """A grain IterDataset of a StreamSource's documents for one process (see the module docstring)."""

  def __init__(self, source, *, shuffle, seed, repeat, process_index, process_count):
    super().__init__()
    self._source = source
    self._shuffle = shuffle
    self._seed = seed
    self._repeat = repeat
    self._process = (process_index, process_count)

  def __iter__(self):
    return _StreamIterator(self._source, self._shuffle, self._seed, self._repeat, self._process)

  def __str__(self):
    return f"StreamDataset({self._source.what})"


class _StreamIterator(grain.DatasetIterator):
  """Yields this process's documents; state {epoch, file, position, documents} (JSON)."""

  def __init__(self, source, shuffle, seed, repeat, process):
    super().__init__()
    self._source = source
    self._shuffle, self._seed, self._repeat = shuffle, seed, repeat
    self._process_index, self._process_count = process
    self._state = dict(epoch=0, file=0, position=[0, 0], documents=0)
    self._reader = None
    self._bad = records.BadRecords(source.what, source.max_bad_fraction)

  def _file_index(self):
    seed = [self._seed, self._state["epoch"]] if self._shuffle else None
    return int(_file_order(len(self._source.paths), seed)[self._state["file"]])

  def _next_file(self):
    """Moves to the next file (and epoch); raises StopIteration at the end of a finite pass."""
    self._close()
    state = self._state
    state["file"] += 1
    state["position"] = [0, 0]
    if state["file"] < len(self._source.paths):
      return
    self._bad.check(final=True)
    if not self._repeat:
      raise StopIteration
    if state["documents"] == 0:
      raise records.DataError(f"{self._source.what} has no documents.")
    state["epoch"] += 1
    state["file"] = 0

  def __next__(self):
    state = self._state
    while True:
      if state["file"] >= len(self._source.paths):
        raise StopIteration
      if self._reader is None:
        path = self._source.paths[self._file_index()]
        self._reader = (path, self._source.read(self._file_index(), state["position"]))
      path, reader = self._reader
      item = next(reader, None)
      if item is None:
        self._next_file()
        continue
      state["position"], text, why = item
      self._bad.count(text, f"{path}:{state['position'][1]}", why)
      self._bad.check()
      if not text or not text.strip():
        continue
      state["documents"] += 1
      if (state["documents"] - 1) % self._process_count == self._process_index:
        return text

  def _close(self):
    if self._reader is not None:
      self._reader[1].close()
      self._reader = None

  def get_state(self):
    return dict(self._state, position=[int(p) for p in self._state["position"]])

  def set_state(self, state):
    self._close()
    self._state = dict(state, position=list(state["position"]))
