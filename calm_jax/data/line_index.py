"""The line-offset index of an uncompressed line file: a sidecar made once (in parallel), memory-mapped.

For FILE (a `jsonl:` or `lines:` file) the index is FILE.calm-index.TAG.npy, an int64[n, 2]
array of the (start, end) byte offsets of its n documents (bad and empty lines left out), and
FILE.calm-index.TAG.json, its counts (lines, empty, bad, the first bad file:line positions)
and the size and mtime of FILE it was made from; TAG names the JSON field ('lines' for plain
text). A changed FILE is indexed again. Where FILE's directory is not writable the sidecar
goes to ~/.cache/calm_jax/line_index/. Files over _CHUNK_BYTES are indexed in chunks of
_CHUNK_BYTES by a pool of processes (a chunk holds the lines that start in it), so indexing a
corpus takes one pass over it on every core; memory stays flat in file size (the offsets go
to the .npy, which is read back memory-mapped).
"""
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re

import numpy as np

from calm_jax.data import records

_CHUNK_BYTES = 64 << 20
_VERSION = 1


_SIDECAR = ".calm-index."


def is_sidecar(path):
  return _SIDECAR in os.path.basename(path)


def _tag(field):
  if field is None:
    return "lines"
  return field if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", field) else (
      "f" + hashlib.sha1(field.encode()).hexdigest()[:12])


def _sidecar_base(path, field, writable_only=False):
  """FILE.calm-index.TAG beside FILE, or under ~/.cache when FILE's directory is not writable."""
  base = f"{path}{_SIDECAR}{_tag(field)}"
  if os.access(os.path.dirname(path) or ".", os.W_OK) or (
      not writable_only and os.path.exists(base + ".json")):
    return base
  cache = os.path.join(os.path.expanduser("~"), ".cache", "calm_jax", "line_index")
  os.makedirs(cache, exist_ok=True)
  digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
  return os.path.join(cache, f"{os.path.basename(path)}.{digest}{_SIDECAR}{_tag(field)}")


def index_chunk(path, field, start, end):
  """The documents of the lines of `path` that start in [start, end): offsets and counts.

  Line numbers in the bad positions are counted from the chunk's first line; the caller adds
  the lines of the chunks before it.
  """
  offsets, bad_first = [], []
  lines = empty = bad = 0
  with open(path, "rb") as f:
    if start:
      f.seek(start - 1)
      start += len(f.readline()) - 1  # the line running into the chunk belongs to the last one
    position = start
    while position < end:
      raw = f.readline()
      if not raw:
        break
      line = raw[:-1] if raw.endswith(b"\n") else raw
      line_start, position = position, position + len(raw)
      lines += 1
      if not line.strip():
        empty += 1
        continue
      text, why = records.parse_line(line, field)
      if text is None:
        bad += 1
        if len(bad_first) < records.FIRST_BAD:
          bad_first.append((lines, why))
      elif not text.strip():
        empty += 1
      else:
        offsets.append((line_start, line_start + len(line)))
  return np.asarray(offsets, np.int64).reshape(-1, 2), lines, empty, bad, bad_first


def _build(path, field, workers):
  size = os.path.getsize(path)
  bounds = list(range(0, size, _CHUNK_BYTES)) or [0]
  jobs = [(path, field, s, min(s + _CHUNK_BYTES, size)) for s in bounds]
  if len(jobs) > 1 and workers > 1:
    ctx = multiprocessing.get_context("spawn")  # safe after JAX has started threads
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
      results = list(pool.map(index_chunk, *zip(*jobs)))
  else:
    results = [index_chunk(*job) for job in jobs]
  counts = dict(lines=0, empty=0, bad=0, first=[])
  for _, lines, empty, bad, bad_first in results:
    counts["first"] += [f"{path}:{counts['lines'] + n}: {why}" for n, why in bad_first]
    counts["lines"] += lines
    counts["empty"] += empty
    counts["bad"] += bad
  counts["first"] = counts["first"][:records.FIRST_BAD]
  return np.concatenate([r[0] for r in results]), counts


def _stamp(path):
  stat = os.stat(path)
  return dict(version=_VERSION, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def load(path, field, workers=None):
  """(offsets int64[n, 2] memory-mapped, counts dict) of `path`, made and saved if missing or stale."""
  base = _sidecar_base(path, field)
  try:
    with open(base + ".json") as f:
      meta = json.load(f)
    if {k: meta.get(k) for k in ("version", "size", "mtime_ns")} == _stamp(path):
      return np.load(base + ".npy", mmap_mode="r"), meta["counts"]
  except (OSError, ValueError):
    pass  # no sidecar yet, or a broken one: make it again
  offsets, counts = _build(path, field, workers or os.cpu_count() or 1)
  base = _sidecar_base(path, field, writable_only=True)
  suffix = f".tmp{os.getpid()}"
  np.save(base + suffix + ".npy", offsets)
  os.replace(base + suffix + ".npy", base + ".npy")
  with open(base + suffix + ".json", "w") as f:
    json.dump(dict(_stamp(path), field=field, counts=counts), f)
  os.replace(base + suffix + ".json", base + ".json")  # written last: marks the index complete
  return np.load(base + ".npy", mmap_mode="r"), counts
