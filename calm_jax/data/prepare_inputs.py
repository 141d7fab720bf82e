"""calm-prepare's inputs: a text SPEC as units (files or random-access sources) cut into parts.

A unit is one jsonl:/lines: file (plain, .gz or .zst), one Parquet file, or one random-access
source (builtin:, text:, tfds:). A unit is cut into parts that depend only on its content:
a line file's part ends at the first line boundary after `part_bytes` uncompressed bytes, a
Parquet part is one row group, a random-access part is `part_docs` documents. One part becomes
one ArrayRecord shard, so parts are the unit of parallel work, of splitting across machines
and of resuming. Parts of a line file are found while reading it (a compressed file cannot
be cut without reading it), so a reader walks the whole unit and tokenizes only the parts it
owns; Parquet and random-access units jump to their parts.

assign() splits the (unit, part) grid between `n` owners: whole units when there are at
least n of them (each file is read by one owner only), else parts round-robin. Applied twice
(machines of --num_shards, then local --num_workers) every part has exactly one owner.
"""
import dataclasses
import os

from calm_jax.data import records
from calm_jax.data import sources
from calm_jax.data import streams

LINE_SCHEMES = ("jsonl", "lines")


@dataclasses.dataclass(frozen=True)
class Unit:
  """One input unit: scheme 'jsonl' | 'lines' | 'parquet' (a file) or 'source' (a SPEC)."""
  scheme: str
  path: str        # the file, or the SPEC of a random-access source
  field: str = None

  @property
  def what(self):
    return f"{self.scheme}:{self.path}"


def units(spec):
  """The units of a text SPEC, in SPEC order (files sorted within each glob)."""
  out = []
  for part, weight in sources.split_specs(spec):
    if weight is not None:
      raise records.DataError(
          f"{spec!r} has weights: calm-prepare each component into its own directory and mix "
          "the shards in training (arrayrecord:A@0.7,arrayrecord:B@0.3).")
    scheme, _, body = part.partition(":")
    if scheme == "arrayrecord":
      raise records.DataError(f"{part!r} is already tokenized (arrayrecord); give a text SPEC.")
    if scheme in LINE_SCHEMES or scheme == "parquet":
      pattern, field = sources.split_field(body) if scheme != "lines" else (body, None)
      paths = sources.expand_glob(scheme, pattern)
      if scheme == "parquet":
        streams.check_parquet_column(paths[0], field)
      out += [Unit(scheme, p, field) for p in paths]
    else:
      sources.check_spec(part)
      out.append(Unit("source", part))
  return out


def assign(n_units, n, unit, part):
  """(owner in range(n), (unit', part') to split further among that owner's helpers, n_units')."""
  if n_units >= n:
    return unit % n, (unit // n, part), len(range(unit % n, n_units, n))
  return (unit + part) % n, (unit, (unit + part) // n), n_units


def owner(n_units, levels, unit, part):
  """The owner path of (unit, part) for levels [(n, index), ...]: True if every index matches."""
  for n, index in levels:
    got, (unit, part), n_units = assign(n_units, n, unit, part)
    if got != index:
      return False
  return True


def reads_unit(n_units, levels, unit):
  """False when whole units are assigned and this unit belongs to another owner."""
  for n, index in levels:
    if n_units < n:
      return True
    if unit % n != index:
      return False
    unit, n_units = unit // n, len(range(index, n_units, n))
  return True


def _line_parts(unit, part_bytes):
  """Yields (part, records) for the parts of a line file; records yields (text|None, where, why,
  nbytes): nbytes is the line's length in the (uncompressed) file."""
  state = dict(part=0, part_end=part_bytes, offset=0, line=0, pending=None)

  def lines_of_part(f, part):
    while True:
      raw = state["pending"] if state["pending"] is not None else f.readline()
      state["pending"] = None
      if not raw:
        return
      if state["offset"] >= state["part_end"]:  # this line opens the next part
        state["pending"] = raw
        state["part"] += 1
        state["part_end"] = state["offset"] + part_bytes
        return
      state["offset"] += len(raw)
      state["line"] += 1
      yield part, state["line"], raw

  with records.open_binary(unit.path) as f:
    while True:
      part = state["part"]
      raw_lines = lines_of_part(f, part)
      yield part, _parsed(unit, raw_lines)
      for _ in raw_lines:  # a part not read by the caller is skipped without parsing
        pass
      if state["pending"] is None:
        return


def _parsed(unit, raw_lines):
  field = None if unit.scheme == "lines" else unit.field
  for _, line_number, raw in raw_lines:
    line = raw[:-1] if raw.endswith(b"\n") else raw
    where = f"{unit.path}:{line_number}"
    if not line.strip():
      yield "", where, None, len(raw)
      continue
    text, why = records.parse_line(line, field)
    yield text, where, why, len(raw)


def _parquet_parts(unit):
  parquet = streams.parquet_file(unit.path)
  first = 0
  for group in range(parquet.num_row_groups):
    rows = parquet.metadata.row_group(group).num_rows
    yield group, _parquet_rows(unit, group, first)
    first += rows


def _parquet_rows(unit, group, first):
  parquet = streams.parquet_file(unit.path)
  values = parquet.read_row_group(group, columns=[unit.field]).column(0).to_pylist()
  for i, value in enumerate(values):
    text, why = streams.parquet_text(value, unit.field)
    yield text, f"{unit.path}:{first + i + 1}", why, 0


def _source_parts(unit, part_docs):
  source = sources.parse_spec(unit.path)
  for part, start in enumerate(range(0, max(len(source), 1), part_docs)):
    indices = range(start, min(start + part_docs, len(source)))
    yield part, ((source[i] or "", f"{unit.path} document {i}", None, 0) for i in indices)


def parts(unit, part_bytes, part_docs):
  """Yields (part index, records) in order; consume (or drop) each records before the next.

  records yields (text | None, where, why, nbytes); nbytes is 0 outside jsonl:/lines: files.
  """
  if unit.scheme in LINE_SCHEMES:
    return _line_parts(unit, part_bytes)
  if unit.scheme == "parquet":
    return _parquet_parts(unit)
  return _source_parts(unit, part_docs)


def line_part_sizes(path, part_bytes):
  """Byte sizes of the parts of an uncompressed line file, cut as _line_parts cuts them.

  A part ends at the first line start at or after its start + part_bytes: one seek and
  one line read per part, not a read of the file.
  """
  size = os.path.getsize(path)
  starts = [0]
  with open(path, "rb") as f:
    while starts[-1] + part_bytes < size:
      f.seek(starts[-1] + part_bytes - 1)
      f.readline()         # up to the first newline at or after start + part_bytes - 1
      if f.tell() >= size:
        break
      starts.append(f.tell())
  return [end - start for start, end in zip(starts, starts[1:] + [size])]


def part_sizes(unit, part_bytes, part_docs):
  """The parts' sizes, in bytes for a line file and in records otherwise; None for a
  compressed line file (its parts are known only by reading it)."""
  if unit.scheme in LINE_SCHEMES:
    return None if records.is_compressed(unit.path) else line_part_sizes(unit.path, part_bytes)
  if unit.scheme == "parquet":
    metadata = streams.parquet_file(unit.path).metadata
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
  n = len(sources.parse_spec(unit.path))
  return [min(part_docs, n - start) for start in range(0, max(n, 1), part_docs)]
